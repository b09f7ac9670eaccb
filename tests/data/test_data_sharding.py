"""Who reads which shard: uniform shard use for any reader count, web passes split exactly,
each reader opening only its own shards, shard interleaving, shard-list files, one glob per job."""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import socket
from collections import Counter
from pathlib import Path

import pytest
from test_data_helpers import all_keys, image_bytes, web_shards, write_tar

import pixio.data.shards as shards_module
import pixio.data.stream as stream_module
from pixio.data import build_pretrain_dataset
from pixio.data.plan import Reader, StreamKey

ENCODED = dict(input_size=16, shuffle_buffer=50)


def imagenet_shards(root: Path, n_shards: int, per_shard: int) -> None:
    """`root/train-XX.tar` shards of `per_shard` tiny .jpg samples (bytes are never decoded)."""
    data = image_bytes()
    for s in range(n_shards):
        samples = [{"__key__": f"{s:02d}{i:03d}", "jpg": data} for i in range(per_shard)]
        write_tar(root / f"train-{s:02d}.tar", samples)


def chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def noise_bound(n_shards: int) -> float:
    """About 4 standard deviations above the mean of a chi-square with n - 1 d.o.f."""
    dof = n_shards - 1
    return dof + 4 * math.sqrt(2 * dof)


def count_opens(monkeypatch) -> list[str]:
    """Record every shard the streams open (in this process)."""
    opened: list[str] = []
    real = stream_module.read_shard

    def read_shard(shard, report, *args):
        opened.append(str(shard))
        return real(shard, report, *args)

    monkeypatch.setattr(stream_module, "read_shard", read_shard)
    return opened


def sliced_counts(n_shards: int, readers: int, take: int) -> list[float]:
    """Per-shard counts of the old plan: reader i resamples only its slice shards[i::readers]."""
    counts = [0.0] * n_shards
    for i in range(min(readers, n_shards)):
        mine = range(i, n_shards, readers)
        for s in mine:
            counts[s] += take / len(mine)
    return counts


@pytest.mark.parametrize(
    "n_shards, world, workers",
    [(20, 2, 4), (12, 4, 4), (13, 3, 2)],
    ids=["shards_not_divisible_by_readers", "more_readers_than_shards", "odd_counts"],
)
def test_imagenet_every_shard_is_equally_likely(
    tmp_path: Path, monkeypatch, n_shards: int, world: int, workers: int
) -> None:
    per_shard, take, buffer, interleave = 20, 300, 10, 8
    imagenet_shards(tmp_path, n_shards, per_shard)
    opened = count_opens(monkeypatch)
    per_shard_count: Counter[str] = Counter()
    for rank in range(world):
        ds = build_pretrain_dataset(
            tmp_path, rank=rank, world_size=world, input_size=16, shuffle_buffer=buffer
        )
        for worker in range(workers):
            before = len(opened)
            stream = ds.encoded_stream(Reader(rank, worker, workers, world), StreamKey(0))
            per_shard_count.update(s.shard for s in itertools.islice(stream, take))
            # Opens follow what the reader consumes (plus the open set), not the shard count.
            assert len(opened) - before <= interleave + math.ceil((take + buffer) / per_shard)
    counts = [per_shard_count[str(s)] for s in ds.shards]
    assert chi_square(counts) < noise_bound(n_shards), counts
    if n_shards > world * workers:  # the same bound rejects the old fixed slices
        assert chi_square(sliced_counts(n_shards, world * workers, take)) > noise_bound(n_shards)


@pytest.mark.parametrize(
    "n_shards, world, workers",
    [(3, 2, 4), (10, 2, 3), (6, 3, 2)],
    ids=["more_readers_than_shards", "shards_not_divisible", "one_shard_each"],
)
def test_web_pass_shows_every_sample_once_and_readers_open_only_their_shards(
    tmp_path: Path, monkeypatch, n_shards: int, world: int, workers: int
) -> None:
    members = web_shards(tmp_path, n_shards, 7)
    opened = count_opens(monkeypatch)
    keys, opens = [], []
    for rank in range(world):
        ds = build_pretrain_dataset(tmp_path, kind="web", rank=rank, world_size=world, passes=1, **ENCODED)  # fmt: skip
        for worker in range(workers):
            before = len(opened)
            reader = Reader(rank, worker, workers, world)
            keys += [s.key for s in ds.encoded_stream(reader, StreamKey(0))]
            opens.append(len(opened) - before)
    assert sorted(keys) == all_keys(members)  # every sample exactly once across readers
    readers = world * workers
    expected = [1] * readers if readers > n_shards else [len(range(i, n_shards, readers)) for i in range(readers)]  # fmt: skip
    assert opens == expected  # each reader opens only its own shard(s) of the pass


def test_first_batch_mixes_many_shards(tmp_path: Path) -> None:
    web_shards(tmp_path, 12, 100)
    default = build_pretrain_dataset(tmp_path, kind="web", input_size=16, return_keys=True)
    first = [key.split("#")[0] for _, key in itertools.islice(default, 16)]
    assert len(set(first)) >= 6
    # Interleaving alone (no shuffle buffer) already takes the first 16 from 8 shards.
    plain = build_pretrain_dataset(tmp_path, kind="web", input_size=16, shuffle_buffer=0, return_keys=True)  # fmt: skip
    first = [key.split("#")[0] for _, key in itertools.islice(plain, 16)]
    assert Counter(Counter(first).values()) == {2: 8}


def test_shuffle_buffer_is_bounded_by_bytes(tmp_path: Path, monkeypatch) -> None:
    web_shards(tmp_path, 4, 50)
    ds = build_pretrain_dataset(tmp_path, kind="web", input_size=16, shuffle_buffer_mb=0.01)
    size = len(image_bytes(seed=1))  # ~1.5 KB per sample: 10 KiB holds about 7
    stream = ds.encoded_stream(Reader(0, 0, 1, 1), StreamKey(0))
    next(stream)
    read = stream.bytes_read
    assert read <= 10 * 1024 + 2 * size


# ---- shard lists and discovery ------------------------------------------------------------------
def test_shard_list_resolves_relative_entries_against_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    members = web_shards(root, 3, 2)
    a, b, c = sorted(members)
    listing = tmp_path / "lists" / "shards.txt"
    listing.parent.mkdir()
    listing.write_text(f"# two of three\n\n  a/{Path(c).name}  \n{a}\n# {b}\n")
    ds = build_pretrain_dataset(root, kind="web", shard_list=listing, **ENCODED)
    assert ds.shards == [Path(c), Path(a)]  # file order, comments and blank lines ignored


def test_shard_list_with_a_missing_entry_names_the_list_and_the_path(tmp_path: Path) -> None:
    web_shards(tmp_path, 2, 2)
    listing = tmp_path / "shards.txt"
    listing.write_text("a/s0.tar\na/gone.tar\na/s1.tar\n/elsewhere/x.tar\n")
    with pytest.raises(FileNotFoundError) as err:
        build_pretrain_dataset(tmp_path, kind="web", shard_list=listing)
    message = str(err.value)
    assert str(listing) in message and str(tmp_path / "a" / "gone.tar") in message
    assert "2 of 4" in message
    with pytest.raises(FileNotFoundError, match="no shard"):
        listing.write_text("# nothing\n")
        build_pretrain_dataset(tmp_path, kind="web", shard_list=listing)


def _rank_main(rank: int, port: int, root: str, queue) -> None:
    """One rank of a 2-process gloo job: build the dataset, report how often it looked."""
    import torch
    import torch.distributed as dist

    # As in a DataLoader worker: OpenMP threads inherited through fork would hang (libgomp).
    torch.set_num_threads(1)
    looks = []
    real = shards_module.find_shards
    shards_module.find_shards = lambda *a, **k: looks.append(1) or real(*a, **k)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = build_pretrain_dataset(root, kind="web", rank=rank, world_size=2)
        try:
            build_pretrain_dataset(root + "/missing", kind="web", rank=rank, world_size=2)
            error = None
        except FileNotFoundError as err:
            error = str(err)
        queue.put((rank, len(looks), [str(s) for s in ds.shards], error))
    finally:
        dist.destroy_process_group()


def test_one_rank_globs_and_broadcasts_the_list(tmp_path: Path) -> None:
    members = web_shards(tmp_path, 3, 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path), queue)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    (r0, looks0, shards0, err0), (r1, looks1, shards1, err1) = results
    assert (looks0, looks1) == (2, 0)  # rank 0 looked (twice: two datasets), rank 1 never
    assert shards0 == shards1 == sorted(members)
    assert err0 == err1 and "missing" in err0  # rank 0's error reaches every rank


def test_web_readers_sharing_a_shard_is_logged_once(tmp_path: Path, caplog) -> None:
    web_shards(tmp_path, 2, 4)
    ds = build_pretrain_dataset(tmp_path, kind="web", world_size=3, rank=0, passes=1, **ENCODED)
    with caplog.at_level(logging.INFO, logger="pixio.data"):
        for worker in range(2):
            list(ds.encoded_stream(Reader(0, worker, 2, 3), StreamKey(0)))
    assert sum("readers sharing a shard" in r.getMessage() for r in caplog.records) == 1


def test_shard_reader_matches_webdataset_samples(tmp_path: Path) -> None:
    import webdataset as wds

    from pixio.data.counters import ShardReport

    shard = write_tar(
        tmp_path / "s.tar",
        [
            {"__key__": "dir/a", "jpg": b"1", "cls": b"3", "json": b"{}"},
            {"__key__": "b", "JPEG": b"2"},
            {"__key__": "c.part", "jpeg": b"3"},  # the key ends at the first dot of the name
        ],
    )
    ours = list(shards_module.read_shard(shard, ShardReport(str(shard), None)))
    theirs = list(wds.tarfile_samples(iter([{"url": str(shard)}])))
    assert ours == theirs and [s["__key__"] for s in ours] == ["dir/a", "b", "c"]
    assert ours[2]["part.jpeg"] == b"3" and ours[1]["jpeg"] == b"2"  # lower-cased extension


def test_samples_inside_a_shard_are_equally_likely_when_epochs_end_mid_shard(
    tmp_path: Path,
) -> None:
    """Readers deliver about one shard's worth per epoch from 8 interleaved shards, so each read
    stops early: a read must start at a random place, or only the shards' heads are ever used."""
    n_shards, per_shard, readers, epochs = 16, 100, 4, 6
    imagenet_shards(tmp_path, n_shards, per_shard)
    ds = build_pretrain_dataset(tmp_path, rank=0, world_size=1, input_size=16, shuffle_buffer=50)
    seen: Counter[int] = Counter()  # by position inside the shard
    distinct: set[str] = set()
    owed = n_shards * per_shard // readers  # one epoch of the data set
    for epoch in range(epochs):
        for worker in range(readers):
            stream = ds.encoded_stream(Reader(0, worker, readers, 1), StreamKey(epoch), owed)
            for sample in itertools.islice(stream, owed):
                index = int(sample.key.rsplit("#", 1)[1][2:5])
                seen[index] += 1
                distinct.add(sample.key)
    assert sum(seen.values()) == epochs * n_shards * per_shard
    # Heads only (the old behaviour) would see indices < 25; every decile of the shard is used.
    deciles = [sum(seen[i] for i in range(d * 10, d * 10 + 10)) for d in range(10)]
    expected = sum(deciles) / 10
    assert all(abs(d - expected) < 0.35 * expected for d in deciles), deciles
    assert len(distinct) > 0.9 * n_shards * per_shard  # 6 epochs cover nearly every sample


def test_a_rotated_read_yields_every_sample_once(tmp_path: Path) -> None:
    imagenet_shards(tmp_path, 1, 10)
    shard = tmp_path / "train-00.tar"
    from pixio.data.counters import ShardReport

    report = ShardReport(str(shard), None)
    keys = [s["__key__"] for s in shards_module.read_shard(shard, report, 0.35)]
    assert keys == [f"00{i:03d}" for i in (*range(3, 10), *range(3))]
