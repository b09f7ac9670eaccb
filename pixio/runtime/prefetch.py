"""Device batches: raw uint8 images normalised on the device, the next batch copied ahead.

Data workers hand over uint8 images (a quarter of float32's bytes through worker shared memory,
pinning and PCIe); `normalize_images` turns them into ImageNet-normalised float32 where the
model runs, the one place in the library that does (every task's `to_device` calls
`normalize_batch`). The arithmetic is the one the workers used before, `x * 1/(255 std) +
(-mean/std)` in float32, so on the CPU the values are bit-identical to the former float32
batches.

`DevicePrefetcher` (CUDA): while the current step runs, the next batch is already being copied
on a side stream. On the CPU it is a pass-through: each item is transferred when it is asked
for, nothing is fetched ahead. See docs/performance.md (the MFU plan, item 2) and docs/data.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD

IMAGE_KEY = "image"  # the images of a dict batch (pre-training tests, evaluation datasets)
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_bias(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/(255 std), -mean/std) as (1, 3, 1, 1) float32 on `device`, made once per device (a
    fresh host-to-device copy per batch would make the host wait for the device)."""
    if device not in _CONSTANTS:
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        _CONSTANTS[device] = ((1.0 / (255.0 * std)).to(device), (-mean / std).to(device))
    return _CONSTANTS[device]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> ImageNet-normalised float32 on their device. Floating
    images are taken as normalised already and returned unchanged (tests and tools that build
    float batches themselves)."""
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (raw pixels) or floating, got {images.dtype}")
    scale, bias = _scale_bias(images.device)
    shape = (1,) * (images.ndim - 3) + (3, 1, 1)
    return images.float().mul_(scale.view(shape)).add_(bias.view(shape))


def normalize_batch(batch: Any, key: str = IMAGE_KEY) -> Any:
    """A batch on its device with its images normalised: an image tensor, or a dict whose
    `key` holds them (other entries unchanged)."""
    if isinstance(batch, torch.Tensor):
        return normalize_images(batch)
    if isinstance(batch, Mapping) and key in batch:
        return {**batch, key: normalize_images(batch[key])}
    return batch


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested batch (tensors, mappings, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def on_batch(to_device: Callable[[Any], Any]) -> Callable[[tuple[int, Any]], tuple[int, Any]]:
    """The transfer of the trainer's (iteration, batch) items: the batch through `to_device`."""
    return lambda item: (item[0], to_device(item[1]))


class DevicePrefetcher:
    """Items of `source` passed through `transfer` (host batch -> device batch), one ahead on
    CUDA: when item i is handed out, item i + 1 has been taken from `source` and its transfer
    issued on a side stream, so its copy overlaps step i. On other devices a pass-through.

    CUDA stream rules (untested here: this machine has no GPU): `transfer` runs under the side
    stream, so its copies (`non_blocking=True` from pinned memory) and the normalisation
    kernels go there; handing the item out makes the consuming stream wait for the side stream
    (`wait_stream`) and records the consuming stream on every tensor of the item
    (`record_stream`), so the caching allocator does not reuse their memory for the side
    stream's next batch while the step still reads them.

    An error taken from `source` while fetching ahead is raised when the item it belongs to is
    asked for, so the caller sees each failure at the same item as without prefetching. A
    caller that saves its data position while holding item i must know the source is one item
    further (`EpochLoader.state_dict` takes an iteration up to `UNDO_DEPTH` behind).
    """

    def __init__(
        self, source: Iterable[Any], transfer: Callable[[Any], Any], device: torch.device
    ) -> None:
        self.source, self.transfer = iter(source), transfer
        cuda = device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device) if cuda else None
        self._ahead: tuple[Any, BaseException | None] | None = None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self.stream is None:  # CPU: transfer on demand, fetch nothing ahead
            return self.transfer(next(self.source))
        if self._ahead is None:
            self._ahead = self._load()
        item, error = self._ahead
        if error is not None:
            self._ahead = None
            raise error
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)  # the copy and normalisation are done before use
        for tensor in _tensors(item):
            if tensor.device.type == "cuda":
                tensor.record_stream(current)
        self._ahead = self._load()  # the next copy overlaps the step that uses `item`
        return item

    def _load(self) -> tuple[Any, BaseException | None]:
        """The next item transferred on the side stream, or the error taking it raised
        (StopIteration included: raised when that item is asked for)."""
        try:
            host = next(self.source)
        except Exception as err:  # StopIteration, a dead worker: the caller's next item
            return None, err
        with torch.cuda.stream(self.stream):
            return self.transfer(host), None
