"""uint8 batches on the demo shards (real JPEGs, web format, curation statistics): the device
normalisation gives the float32 values the workers used to produce, bit for bit on the CPU and
within the uint8 rounding (0.5 / 255 / std) of a float64 ToTensor + Normalize; the crops are
those of each sample's own decode at its stream position, in stream order; exact resume holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.data import build_pretrain_dataset
from pixio.data.demo import ensure_demo_data
from pixio.data.plan import Cursor, Reader, batch_plan
from pixio.runtime.loader import EpochLoader
from pixio.runtime.prefetch import normalize_batch, normalize_images

pytestmark = pytest.mark.timeout(120)

BATCH, IPE, SIZE = 4, 3, 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), samples=24, shard_size=4, workers=1)


def _dataset(demo: dict):
    return build_pretrain_dataset(
        demo["shards"], kind="web", input_size=SIZE, json_root=demo["json_root"], hist_thresh=3.0,
        seed=3, shuffle_buffer=16, shuffle_buffer_mb=8, shard_interleave=2, rank=0, world_size=1,
    )  # fmt: skip


def _former_float32(images: torch.Tensor) -> torch.Tensor:
    """What the workers computed before: convert, multiply by 1/(255 std), add -mean/std."""
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    scale, bias = 1.0 / (255.0 * std), -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std
    return torch.empty(images.shape, dtype=torch.float32).copy_(images).mul_(scale).add_(bias)


def _expected_crops(ds, workers: int, n: int) -> list[torch.Tensor]:
    """Batch i of a run from iteration 0, rebuilt sample by sample: logical worker i % W walks
    its epoch's encoded stream and decodes each sample at its position."""
    plan = batch_plan(BATCH, workers, IPE, 0)
    crops: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in range(workers):
        for epoch in range(-(-n // IPE)):
            cursor, reader = Cursor(epoch, epoch * IPE), Reader(0, w, workers, 1)
            key = plan.key(cursor)
            owed = plan.owed(w, cursor)
            stream, crops[w, epoch] = ds.encoded_stream(reader, key, owed), []
            while len(crops[w, epoch]) < owed:  # the stream runs on past what is owed
                image = ds.decode(next(stream), reader, key, stream.position - 1)
                crops[w, epoch] += [] if image is None else [image]
    batches = []
    for i in range(n):
        w, epoch = i % workers, i // IPE
        k = len(range(plan.first_iteration(w, epoch * IPE), i, workers))  # its k-th batch
        batches.append(torch.stack(crops[w, epoch][k * BATCH : (k + 1) * BATCH]))
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_normalise_to_the_former_float32_batches(demo, workers: int) -> None:
    ds = _dataset(demo)
    it = EpochLoader(ds, BATCH, workers, seed=3, iters_per_epoch=IPE).iterate(0)
    batches = [next(it) for _ in range(2 * IPE + 1)]  # two epoch boundaries
    it.close()
    tolerance = 0.5 / 255 / max(IMAGENET_STD)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    for batch, crops in zip(batches, _expected_crops(ds, max(1, workers), len(batches)), strict=True):  # fmt: skip
        assert batch.dtype == torch.uint8 and batch.shape == (BATCH, 3, SIZE, SIZE)
        assert torch.equal(batch, crops)  # same crop boxes, same order
        device = normalize_batch(batch)
        assert device.dtype == torch.float32
        assert torch.equal(device, _former_float32(batch))  # the former arithmetic, bit for bit
        reference = (batch.double() / 255 - mean) / std  # ToTensor + Normalize in float64
        assert (device.double() - reference).abs().max() <= tolerance


def test_dict_batches_float_images_and_bad_dtypes() -> None:
    raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    noise = torch.rand(2, 4)
    out = normalize_batch({"image": raw, "noise": noise})
    assert out["noise"] is noise and torch.equal(out["image"], _former_float32(raw))
    floats = torch.randn(2, 3, 4, 4)
    assert normalize_images(floats) is floats  # already normalised (tests, tools)
    assert torch.equal(normalize_images(raw[0]), _former_float32(raw[0]))  # one (3, H, W) image
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(raw.to(torch.int16))


def test_resume_mid_epoch_gives_the_same_uint8_batches(demo, tmp_path: Path) -> None:
    ds = _dataset(demo)
    loader = EpochLoader(ds, BATCH, 2, seed=3, iters_per_epoch=IPE)
    it = loader.iterate(0)
    full = [next(it) for _ in range(6)]
    it.close()
    part = EpochLoader(_dataset(demo), BATCH, 2, seed=3, iters_per_epoch=IPE)
    it = part.iterate(0)
    for _ in range(4):  # iteration 3 was fetched, 4 prefetched: neither was used
        next(it)
    it.close()
    state = part.state_dict(2)
    resumed = EpochLoader(_dataset(demo), BATCH, 2, seed=3, iters_per_epoch=IPE)
    resumed.load_state_dict(state)
    it = resumed.iterate(2)
    assert all(torch.equal(next(it), full[i]) for i in range(2, 6))
    it.close()
