"""CheckpointManager in one process: round trips, atomic commit under kills, retention, damaged
checkpoints and fallback, a full disk, async saves, RNG state."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pixio.runtime import checkpoint_dir, optim
from pixio.runtime import checkpointing as ckpt

ROOT = Path(__file__).resolve().parents[2]


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny model and its AdamW after one step (so the optimiser has state)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = optim.build_optimizer(model, 1e-3, 0.05)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def train_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The trainer's layout: model and optimiser state dicts (sharded options, here plain)."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


def load_into_fresh(manager: ckpt.CheckpointManager, seed: int = 99):
    """A differently initialised model + optimiser, loaded from `manager`'s latest."""
    model, opt = trained(seed)
    state = train_state(model, opt)
    found = manager.load_latest(state)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optimizer"])
    return found, model, opt


def assert_same(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple) -> None:
    for k, v in a[0].state_dict().items():
        assert torch.equal(v, b[0].state_dict()[k]), k
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, entry in sa["state"].items():
        for k, v in entry.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def save_steps(out: Path, steps: list[int], **kwargs) -> dict[int, tuple]:
    manager = ckpt.CheckpointManager(out, **kwargs)
    saved = {}
    for step in steps:
        saved[step] = trained(step)
        manager.save(step, train_state(*saved[step]), {"iteration": step})
    manager.close()
    return saved


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".checkpoint-*"))


def snapshot(out: Path) -> dict[str, tuple]:
    """Every entry under `out` with its size, mtime and link target."""
    entries = {}
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            p = Path(root, name)
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else None
            entries[str(p.relative_to(out))] = (st.st_size, st.st_mtime_ns, link)
    return entries


# ---- round trip -------------------------------------------------------------------------------
def test_round_trip_is_bit_exact_with_meta(tmp_path: Path) -> None:
    model, opt = trained(7)
    meta = {"iteration": 7, "config": {"train": {"betas": [0.9, 0.95], "keep_every": None}},
            "rng": [ckpt.capture_rng_state()], "loss": 0.25}  # fmt: skip
    manager = ckpt.CheckpointManager(tmp_path)
    path = manager.save(7, {**train_state(model, opt), "samples": 1234}, meta)
    assert path == tmp_path / "checkpoint-00000007" and path.is_dir()
    assert os.readlink(tmp_path / "checkpoint-last") == "checkpoint-00000007"  # relative
    assert {".metadata", "__0_0.distcp", "meta.pt", "manifest.json"} == {
        p.name for p in path.iterdir()
    }
    assert manager.latest() == path
    fresh, fresh_opt = trained(99)
    for group in fresh_opt.param_groups:  # hyper-parameters are restored too
        group["lr"] = 5.0
    state = {**train_state(fresh, fresh_opt), "samples": 0}
    loaded_path, loaded_meta = ckpt.CheckpointManager(tmp_path).load_latest(state)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optimizer"])
    assert loaded_path == path and state["samples"] == 1234
    assert loaded_meta["config"] == meta["config"] and loaded_meta["loss"] == 0.25
    assert torch.equal(loaded_meta["rng"][0]["torch"], meta["rng"][0]["torch"])
    assert_same((model, opt), (fresh, fresh_opt))


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert ckpt.CheckpointManager(tmp_path / "missing").load_latest({}) is None
    (tmp_path / ".checkpoint-00000001.tmp-abc").mkdir()  # only a killed first save
    assert ckpt.CheckpointManager(tmp_path).load_latest({}) is None
    assert ckpt.find_latest(tmp_path) is None


def test_load_checkpoint_reads_sections_and_meta(tmp_path: Path) -> None:
    saved = save_steps(tmp_path, [3])
    got = ckpt.load_checkpoint(tmp_path / "checkpoint-last")
    assert got["iteration"] == 3 and "optimizer" not in got
    for k, v in saved[3][0].state_dict().items():
        assert torch.equal(got["model"][k], v)
    both = ckpt.load_checkpoint(tmp_path / "checkpoint-last", ("model", "optimizer"))
    assert both["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    with pytest.raises(ckpt.CheckpointError, match="nothing-here"):
        ckpt.load_checkpoint(tmp_path / "nothing-here")


def test_state_and_meta_must_survive_weights_only(tmp_path: Path) -> None:
    manager = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="meta holds objects"):
        manager.save(1, {"w": torch.ones(2)}, {"bad": object()})
    with pytest.raises(ckpt.CheckpointError, match=r"extra\.thing \(object\) is not a tensor"):
        manager.save(1, {"w": torch.ones(2), "extra": {"thing": object()}}, {})
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_same_step_saved_again_replaces_it(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    again = save_steps(tmp_path, [2])[2]
    (found, meta), *loaded = load_into_fresh(ckpt.CheckpointManager(tmp_path))
    assert found.name == "checkpoint-00000002"
    assert_same(again, tuple(loaded))
    save_steps(tmp_path, [3])
    assert leftovers(tmp_path) == []


# ---- retention --------------------------------------------------------------------------------
def test_retention_keep_last_and_keep_every(tmp_path: Path) -> None:
    manager = ckpt.CheckpointManager(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 11):
        manager.save(step, {"w": torch.full((3,), float(step))}, {"iteration": step})
    assert [s for s, _ in ckpt.numbered_checkpoints(tmp_path)] == [4, 8, 9, 10]
    state = {"w": torch.zeros(3)}
    path, meta = manager.load_latest(state)
    assert meta["iteration"] == 10 and torch.equal(state["w"], torch.full((3,), 10.0))
    assert leftovers(tmp_path) == []


def kept_by_rule(steps: list[int], keep_last: int, keep_every: int | None) -> list[int]:
    """Retention as the docs state it: the `keep_last` newest (all while there are fewer),
    every step divisible by `keep_every`, and the newest always."""
    newest_first = sorted(steps, reverse=True)
    kept = {s for rank, s in enumerate(newest_first) if rank < keep_last or rank == 0}
    return sorted(kept | {s for s in steps if keep_every and s % keep_every == 0})


def test_prune_matches_the_rule_for_every_setting_up_to_10(tmp_path: Path, monkeypatch) -> None:
    """prune_checkpoints on numbered directories (no data), for keep_last 0-10, keep_every none
    or 1-10: at once on 0-10 checkpoints (deletions recorded, not made, so one folder per count
    serves every setting), and after each of 10 saves in turn, deleting for real."""
    settings = [(k, e) for k in range(11) for e in (None, *range(1, 11))]
    folders = []
    for count in range(11):
        folders.append(tmp_path / f"once-{count}")
        for step in range(1, count + 1):
            (folders[-1] / ckpt.numbered_name(step)).mkdir(parents=True)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_dir, "_remove_checkpoint", lambda path: None)
        for (keep_last, keep_every), count in itertools.product(settings, range(11)):
            newest = folders[count] / ckpt.numbered_name(count) if count else None
            deleted = ckpt.prune_checkpoints(folders[count], keep_last, keep_every, newest)
            got = sorted(set(range(1, count + 1)) - {int(p.name[11:]) for p in deleted})
            assert got == kept_by_rule(list(range(1, count + 1)), keep_last, keep_every), (
                keep_last, keep_every, count)  # fmt: skip
    for case, (keep_last, keep_every) in enumerate(settings):
        out = tmp_path / f"each-{case}"
        for step in range(1, 11):  # as CheckpointManager does: prune after every commit
            (out / ckpt.numbered_name(step)).mkdir(parents=True)
            newest = out / ckpt.numbered_name(step)
            ckpt.prune_checkpoints(out, keep_last, keep_every, protect=newest)
            got = [s for s, _ in ckpt.numbered_checkpoints(out)]
            assert got == kept_by_rule(list(range(1, step + 1)), keep_last, keep_every), (
                keep_last, keep_every, step)  # fmt: skip


def test_manager_keeps_the_newest_while_fewer_than_keep_last_exist(tmp_path: Path) -> None:
    """The reported case: keep_last=3 kept 1 checkpoint and keep_last=5 kept 2 of 5."""
    for keep_last, keep_every in ((3, None), (5, None), (3, 4)):
        out = tmp_path / f"k{keep_last}-{keep_every}"
        manager = ckpt.CheckpointManager(out, keep_last=keep_last, keep_every=keep_every)
        for step in range(1, 8):
            manager.save(step, {"w": torch.full((2,), float(step))}, {"iteration": step})
            got = [s for s, _ in ckpt.numbered_checkpoints(out)]
            assert got == kept_by_rule(list(range(1, step + 1)), keep_last, keep_every), step
        assert os.readlink(out / ckpt.LAST_NAME) == ckpt.numbered_name(7)
        assert leftovers(out) == []


def test_keep_last_zero_still_keeps_the_latest(tmp_path: Path) -> None:
    manager = ckpt.CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        manager.save(step, {"w": torch.ones(1)}, {"iteration": step})
    assert [s for s, _ in ckpt.numbered_checkpoints(tmp_path)] == [3]
    assert ckpt.read_meta(tmp_path / "checkpoint-last")["iteration"] == 3


# ---- kills and crashes during a save ----------------------------------------------------------
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from pixio.runtime import checkpointing as ckpt
    out, point = sys.argv[1], sys.argv[2]
    manager = ckpt.CheckpointManager(out)
    manager.save(1, {"w": torch.ones(1000)}, {"iteration": 1})
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    class DyingWriter(ckpt.FileSystemWriter):  # data written, DCP metadata not yet
        def write_data(self, plan, planner):
            super().write_data(plan, planner).wait()
            die()
    real_replace, calls = os.replace, []
    def replace(src, dst):  # 1st: the commit rename; 2nd: the checkpoint-last swap
        calls.append(dst)
        if point == "before_commit" and len(calls) == 1:
            die()
        real_replace(src, dst)
        if (point, len(calls)) in (("after_commit", 1), ("after_pointer", 2)):
            die()
    if point == "during_write":
        ckpt.FileSystemWriter = DyingWriter
    os.replace = replace
    manager.save(2, {"w": torch.full((1000,), 2.0)}, {"iteration": 2})
    """
)


@pytest.mark.parametrize(
    ("point", "expected"),
    [("during_write", 1), ("before_commit", 1), ("after_commit", 2), ("after_pointer", 2)],
)
def test_sigkill_during_save_keeps_a_complete_latest(
    tmp_path: Path, point: str, expected: int, caplog
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), point], env=env, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    assert bool(leftovers(tmp_path)) == (point in ("during_write", "before_commit"))
    manager = ckpt.CheckpointManager(tmp_path)
    assert manager.latest() == tmp_path / f"checkpoint-{expected:08d}"
    state = {"w": torch.zeros(1000)}
    with caplog.at_level(logging.WARNING, logger="pixio.checkpoint"):
        path, meta = manager.load_latest(state)
    assert meta["iteration"] == expected and torch.equal(
        state["w"], torch.full((1000,), float(expected))
    )
    if point == "after_commit":  # the pointer still names step 1: said so, newest used
        assert "checkpoint-00000002 is newer" in caplog.text
    manager.save(3, {"w": torch.ones(1000)}, {"iteration": 3})
    assert leftovers(tmp_path) == []  # the next save removed what the kill left
    assert ckpt.find_latest(tmp_path).name == "checkpoint-00000003"


# ---- damaged checkpoints: fallback, or a clear error with nothing touched ---------------------
def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated data file": lambda d: _truncate(d / "__0_0.distcp"),
    "flipped byte in data file": lambda d: _flip(d / "__0_0.distcp"),
    "deleted .metadata": lambda d: (d / ".metadata").unlink(),
    "corrupt meta file": lambda d: _flip(d / "meta.pt", 0.9),
    "deleted manifest": lambda d: (d / "manifest.json").unlink(),
    "garbage manifest": lambda d: (d / "manifest.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_falls_back_to_older(tmp_path: Path, damage: str, caplog) -> None:
    saved = save_steps(tmp_path, [1, 2])
    DAMAGES[damage](tmp_path / "checkpoint-00000002")
    with caplog.at_level(logging.WARNING, logger="pixio.checkpoint"):
        (path, meta), *loaded = load_into_fresh(ckpt.CheckpointManager(tmp_path))
    assert path.name == "checkpoint-00000001" and meta["iteration"] == 1
    assert_same(saved[1], tuple(loaded))
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "checkpoint-00000002" in warning[0] and "checkpoint-00000001" in warning[0]


def test_pointer_at_garbage_is_reported_and_newest_used(tmp_path: Path, caplog) -> None:
    save_steps(tmp_path, [1, 2])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / ".metadata").write_bytes(b"garbage")
    (tmp_path / "checkpoint-last").unlink()
    (tmp_path / "checkpoint-last").symlink_to("junk")
    with caplog.at_level(logging.WARNING, logger="pixio.checkpoint"):
        (path, meta), *_ = load_into_fresh(ckpt.CheckpointManager(tmp_path))
    assert meta["iteration"] == 2
    assert "checkpoint-last points at junk" in caplog.text and "checkpoint-00000002" in caplog.text
    save_steps(tmp_path, [3])  # the next save repairs the pointer
    assert os.readlink(tmp_path / "checkpoint-last") == "checkpoint-00000003"


def test_all_damaged_raises_and_touches_nothing(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    DAMAGES["flipped byte in data file"](tmp_path / "checkpoint-00000002")
    DAMAGES["deleted .metadata"](tmp_path / "checkpoint-00000001")
    (tmp_path / ".checkpoint-00000003.tmp-dead").mkdir()  # a leftover: must stay too
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as info:
        load_into_fresh(ckpt.CheckpointManager(tmp_path))
    message = str(info.value)
    assert "nothing on disk was changed" in message and "\n" not in message
    assert "checkpoint-00000002: __0_0.distcp does not match its checksum" in message
    assert "checkpoint-00000001: .metadata is missing" in message
    assert snapshot(tmp_path) == before


def test_mismatched_state_fails_every_candidate(tmp_path: Path) -> None:
    save_steps(tmp_path, [1])
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-00000001: .*not_saved"):
        ckpt.CheckpointManager(tmp_path).load_latest({"not_saved": torch.zeros(1)})


def test_old_single_file_format_is_not_silently_ignored(tmp_path: Path) -> None:
    torch.save({"iteration": 5}, tmp_path / "checkpoint-00000005.pth")
    with pytest.raises(ckpt.CheckpointError, match="old format.*checkpoint-00000005.pth"):
        ckpt.CheckpointManager(tmp_path).load_latest({})


# ---- a full disk ------------------------------------------------------------------------------
def _assert_clean_failure(tmp_path: Path, message: str) -> None:
    assert "\n" not in message
    assert f"cannot write checkpoint {tmp_path / 'checkpoint-00000002'}:" in message
    assert "No space left on device (errno 28)" in message
    assert f"the latest checkpoint is still {tmp_path / 'checkpoint-00000001'}" in message
    assert leftovers(tmp_path) == []
    assert [s for s, _ in ckpt.numbered_checkpoints(tmp_path)] == [1]
    assert os.readlink(tmp_path / "checkpoint-last") == "checkpoint-00000001"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_writing_data(tmp_path: Path, monkeypatch) -> None:
    save_steps(tmp_path, [1])
    real_open = pathlib.Path.open

    def full_disk(self, mode="r", *args, **kwargs):  # the kernel's own ENOSPC
        if self.suffix == ".distcp" and "w" in mode:
            return open("/dev/full", mode)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", full_disk)
    big = {"w": torch.randn(512, 1024)}  # larger than the write buffer: fails inside torch.save
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.CheckpointManager(tmp_path).save(2, big, {"iteration": 2})
    monkeypatch.undo()
    _assert_clean_failure(tmp_path, str(info.value))


def test_disk_full_as_torch_reports_it(tmp_path: Path, monkeypatch) -> None:
    """torch's zip writer can lose the errno ("unexpected pos"): the free space tells."""
    save_steps(tmp_path, [1])

    class UnexpectedPos(ckpt.FileSystemWriter):
        def write_data(self, plan, planner):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(ckpt, "FileSystemWriter", UnexpectedPos)
    monkeypatch.setattr(ckpt.os, "statvfs", lambda path: Full())
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.CheckpointManager(tmp_path).save(2, {"w": torch.ones(4)}, {"iteration": 2})
    monkeypatch.undo()
    _assert_clean_failure(tmp_path, str(info.value))
    assert "unexpected pos" in str(info.value)


def test_disk_full_while_writing_the_manifest(tmp_path: Path, monkeypatch) -> None:
    save_steps(tmp_path, [1])
    real = ckpt._write_synced

    def write(path: Path, data: bytes) -> None:
        if path.name == ckpt.MANIFEST_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_synced", write)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.CheckpointManager(tmp_path).save(2, {"w": torch.ones(4)}, {"iteration": 2})
    monkeypatch.undo()
    _assert_clean_failure(tmp_path, str(info.value))


# ---- async saves ------------------------------------------------------------------------------
def test_async_save_stages_then_commits_in_wait(tmp_path: Path) -> None:
    model, opt = trained(5)
    expected = (
        {k: v.clone() for k, v in model.state_dict().items()},
        {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
    )
    manager = ckpt.CheckpointManager(tmp_path / "async", async_save=True)
    final = manager.save(5, train_state(model, opt), {"iteration": 5})
    assert not final.exists()  # committed only in wait()
    with torch.no_grad():  # training goes on: the staged copy must not see this
        for p in model.parameters():
            p.add_(1.0)
        for s in opt.state.values():
            s["exp_avg"].add_(1.0)
    manager.wait()
    assert final.is_dir() and manager.latest() == final
    manager.close()
    (path, meta), *loaded = load_into_fresh(ckpt.CheckpointManager(tmp_path / "async"))
    assert path == final and meta["iteration"] == 5
    for k, v in expected[0].items():
        assert torch.equal(loaded[0].state_dict()[k], v), k
    for i, s in expected[1].items():
        for k, v in s.items():
            assert torch.equal(loaded[1].state_dict()["state"][i][k], v), (i, k)


def test_async_equals_sync(tmp_path: Path) -> None:
    model, opt = trained(6)
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    ckpt.CheckpointManager(sync).save(6, train_state(model, opt), {"iteration": 6})
    manager = ckpt.CheckpointManager(asyn, async_save=True)
    manager.save(6, train_state(model, opt), {"iteration": 6})
    manager.close()
    a = ckpt.load_checkpoint(sync / "checkpoint-last", ("model", "optimizer"))
    b = ckpt.load_checkpoint(asyn / "checkpoint-last", ("model", "optimizer"))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for section in ("model",):
        for k, v in a[section].items():
            assert torch.equal(v, b[section][k]), k
    for fqn, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][fqn][k]), (fqn, k)


def test_async_failure_is_raised_by_the_next_call(tmp_path: Path, monkeypatch) -> None:
    save_steps(tmp_path, [1])

    class Failing(ckpt.FileSystemWriter):
        def write_data(self, plan, planner):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "FileSystemWriter", Failing)
    manager = ckpt.CheckpointManager(tmp_path, async_save=True)
    manager.save(2, {"w": torch.ones(4)}, {"iteration": 2})  # returns: the write fails later
    with pytest.raises(ckpt.CheckpointError) as info:
        manager.close()
    monkeypatch.undo()
    _assert_clean_failure(tmp_path, str(info.value))


# ---- random number generators -----------------------------------------------------------------
def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trip_through_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # and one in numpy's
    ckpt.CheckpointManager(tmp_path).save(0, {}, {"rng": ckpt.capture_rng_state()})
    expected = _draw()
    assert _draw() != expected  # the streams moved on
    ckpt.restore_rng_state(ckpt.read_meta(tmp_path / "checkpoint-last")["rng"])
    assert _draw() == expected
