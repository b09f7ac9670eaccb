"""metrics.jsonl, the console line, throughput, and the wandb logger (offline, or a stand-in for
wandb.init: no network, no credentials of this machine)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pixio.runtime import logging as rlog


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_writer_appends_one_object_per_call(tmp_path: Path) -> None:
    writer = rlog.MetricsWriter(tmp_path / "run")
    writer.write({"step": 1, "epoch": 0.25, "loss": torch.tensor(0.5), "lr": 1e-4})
    # Flushed per line: readable before close.
    assert read_lines(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "epoch": 0.25, "loss": 0.5, "lr": 1e-4}
    ]
    writer.write({"step": 2, "loss": float("nan"), "grad_norm": math.inf})
    writer.close()
    lines = read_lines(tmp_path / "run" / "metrics.jsonl")
    assert lines[1] == {"step": 2, "loss": None, "grad_norm": None}  # strict JSON, no NaN
    rlog.MetricsWriter(tmp_path / "run").write({"step": 3})  # a restart appends
    assert [r["step"] for r in read_lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_metrics_writer_disabled_writes_nothing(tmp_path: Path) -> None:
    writer = rlog.MetricsWriter(tmp_path, enabled=False)
    writer.write({"step": 1})
    writer.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_metrics_rewind_drops_steps_after_resume_point(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo'
    )
    writer = rlog.MetricsWriter(tmp_path)
    assert writer.rewind(4) == 2  # steps 5 and 6 (the torn line is dropped as well)
    writer.write({"step": 5, "loss": 1.0})
    writer.close()
    assert read_lines(path) == [{"step": s} for s in range(1, 5)] + [{"step": 5, "loss": 1.0}]


def test_metrics_writer_cuts_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    writer = rlog.MetricsWriter(tmp_path)
    writer.write({"step": 2})
    writer.close()
    assert read_lines(path) == [{"step": 1}, {"step": 2}]


def test_format_progress_line() -> None:
    metrics = {
        "step": 120,
        "epoch": 0.3,
        "loss": 0.81234,
        "lr": 1.2e-4,
        "images_per_s": 350.12,
        "data_wait": 0.123,
        "max_mem_gb": 1.23,
    }
    line = rlog.format_progress(120, 1000, 192.4, metrics)
    assert line == "[ 120/1000] eta 0:03:12 loss 0.8123 lr 1.2e-04 img/s 350.1 data 12% mem 1.2G"


def test_format_progress_extras_and_unknown_eta() -> None:
    line = rlog.format_progress(5, 10, math.nan, {"loss": 1.0, "grad_norm": 2.5, "acc": 0.5})
    assert line == "[ 5/10] eta ? loss 1.0000 gnorm 2.5 acc 0.5"
    assert rlog.format_duration(90061) == "25:01:01"


def test_throughput_window_smoothing() -> None:
    tp = rlog.Throughput(window=2)
    assert tp.summary() == {"images_per_s": 0.0, "data_wait": 0.0, "step_time": 0.0}
    tp.update(100, 10.0, 9.0)  # a slow first step that leaves the window
    tp.update(64, 0.5, 0.1)
    tp.update(64, 1.5, 0.3)
    s = tp.summary()
    assert s["images_per_s"] == pytest.approx(128 / 2.0)
    assert s["data_wait"] == pytest.approx(0.4 / 2.0)
    assert s["step_time"] == pytest.approx(1.0)


def test_throughput_self_timing(monkeypatch) -> None:
    clock = iter([0.0, 0.25, 1.0])
    monkeypatch.setattr(rlog.time, "perf_counter", lambda: next(clock))
    tp = rlog.Throughput()
    tp.data_ready()  # batch arrived at 0.25 s
    tp.step_done(32)  # step finished at 1.0 s
    assert tp.summary() == {"images_per_s": 32.0, "data_wait": 0.25, "step_time": 1.0}


# ---- wandb ------------------------------------------------------------------------------------
@dataclass
class LoggerCfg:
    name: str = "wandb"
    project: str = "pixio-test"
    entity: str | None = None
    run_name: str | None = None
    mode: str | None = None
    tags: list[str] = field(default_factory=lambda: ["test"])


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch) -> Path:
    """No wandb credentials or settings from this machine: no WANDB_* variables; HOME, the working
    directory, netrc and wandb's folders under tmp_path; a fresh wandb set-up (it reads the
    environment once)."""
    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)  # wandb also reads ./wandb/settings
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield home
    wandb.teardown()


class FakeWandb:
    """Stands in for `wandb.login` / `wandb.init` / `wandb.teardown`: records the calls; `init`
    raises `fail_online` for a run that is not offline."""

    def __init__(self, logged_in: bool, fail_online: Exception | None = None) -> None:
        self.logged_in = logged_in
        self.fail_online = fail_online
        self.inits: list[dict] = []
        self.teardowns = 0

    def login(self, **kwargs):
        assert kwargs == {"prompt": False, "verify": False}  # never asks, never goes online
        return self.logged_in

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.fail_online is not None and kwargs["mode"] != "offline":
            raise self.fail_online
        return SimpleNamespace(id=kwargs["id"], log=lambda *a, **k: None, finish=lambda: None)

    def teardown(self) -> None:
        self.teardowns += 1

    def install(self, monkeypatch) -> FakeWandb:
        import wandb

        for name in ("login", "init", "teardown"):
            monkeypatch.setattr(wandb, name, getattr(self, name))
        return self


def wandb_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pixio.logging"]


def test_wandb_off_never_imports_it(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would raise
    for logger in (
        rlog.WandbLogger(LoggerCfg(), tmp_path, {}, enabled=False),
        rlog.WandbLogger(LoggerCfg(name="none"), tmp_path, {}),
        rlog.WandbLogger(LoggerCfg(mode="disabled"), tmp_path, {}),
    ):
        assert not logger.enabled
        logger.log({"loss": 1.0}, step=1)
        logger.log_image("vis", tmp_path / "missing.png", step=1)
        logger.finish()
    assert not wandb_warnings(caplog)
    assert not (tmp_path / "wandb_run_id.txt").exists()
    assert not (tmp_path / "wandb").exists()


def test_wandb_failure_disables_it_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # e.g. wandb not installed
    logger = rlog.WandbLogger(LoggerCfg(mode="online"), tmp_path, {})
    assert not logger.enabled
    logger.log({"loss": 1.0}, step=1)  # still a no-op, training goes on
    (warning,) = wandb_warnings(caplog)
    assert warning.startswith("wandb disabled: wandb.init failed (ModuleNotFoundError")


def test_wandb_offline_restart_resumes_same_run(no_credentials: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = rlog.WandbLogger(LoggerCfg(mode="offline"), out, {"train": {"epochs": 2}})
    assert first.enabled and first.run.settings.mode == "offline"
    run_id = first.run_id
    assert (out / "wandb_run_id.txt").read_text().strip() == run_id
    first.log({"loss": 1.0, "lr": 1e-3}, step=1)
    first.log_image("reconstruction", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), step=1)
    first.finish()
    first.finish()  # idempotent
    second = rlog.WandbLogger(LoggerCfg(mode="offline"), out, {"train": {"epochs": 2}})
    assert second.run_id == run_id
    second.log({"loss": 0.5}, step=2)
    second.finish()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}"))


def test_no_mode_without_credentials_goes_offline(no_credentials: Path, tmp_path, caplog) -> None:
    # The real wandb: without an API key it would prompt on a terminal, or raise without one.
    out = tmp_path / "run"
    logger = rlog.WandbLogger(LoggerCfg(), out, {})
    assert logger.mode is None
    assert logger.enabled and logger.run.settings.mode == "offline"
    run_id = logger.run_id
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    (warning,) = wandb_warnings(caplog)
    assert warning.startswith("wandb offline: no API key") and "wandb sync" in warning
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}"))


def test_no_mode_follows_wandb_mode_env(no_credentials: Path, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb's own setting, not overridden
    logger = rlog.WandbLogger(LoggerCfg(), tmp_path / "run", {})
    assert logger.run.disabled
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    assert not wandb_warnings(caplog)


def test_no_mode_with_credentials_lets_wandb_decide(no_credentials: Path, monkeypatch, tmp_path):
    fake = FakeWandb(logged_in=True).install(monkeypatch)
    logger = rlog.WandbLogger(LoggerCfg(), tmp_path / "run", {"a": 1})
    (call,) = fake.inits
    assert call["mode"] is None and call["config"] == {"a": 1} and call["resume"] == "allow"
    assert (
        call["id"] == logger.run_id == (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    )
    rlog.WandbLogger(LoggerCfg(mode="online"), tmp_path / "run", {})
    assert fake.inits[1]["mode"] == "online" and fake.inits[1]["id"] == logger.run_id


def test_no_mode_init_failure_falls_back_to_offline_once(
    no_credentials: Path, monkeypatch, tmp_path, caplog
) -> None:
    # e.g. an API key but no network: wandb gives up after its init_timeout.
    fake = FakeWandb(logged_in=True, fail_online=RuntimeError("timed out\nmore")).install(
        monkeypatch
    )
    logger = rlog.WandbLogger(LoggerCfg(), tmp_path / "run", {})
    assert logger.enabled
    assert [c["mode"] for c in fake.inits] == [None, "offline"]
    assert fake.inits[0]["id"] == fake.inits[1]["id"] == logger.run_id  # the same run
    assert fake.teardowns == 1  # frees the id the half-started online run holds
    (warning,) = wandb_warnings(caplog)
    assert warning.startswith("wandb offline: timed out;")


def test_explicit_mode_failure_does_not_fall_back(no_credentials, monkeypatch, tmp_path, caplog):
    fake = FakeWandb(logged_in=True, fail_online=RuntimeError("refused")).install(monkeypatch)
    logger = rlog.WandbLogger(LoggerCfg(mode="online"), tmp_path / "run", {})
    assert not logger.enabled and [c["mode"] for c in fake.inits] == ["online"]
    assert wandb_warnings(caplog) == ["wandb disabled: wandb.init failed (RuntimeError: refused)"]


def test_setup_logging_file_on_rank0_and_idempotent(tmp_path: Path) -> None:
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        rlog.setup_logging(tmp_path / "a", rank=0)
        rlog.setup_logging(tmp_path / "b", rank=0)  # replaces, does not stack
        logging.getLogger("pixio.test").info("hello from rank 0")
        assert "hello from rank 0" in (tmp_path / "b" / "train.log").read_text()
        assert "hello from rank 0" not in (tmp_path / "a" / "train.log").read_text()
        rlog.setup_logging(tmp_path / "c", rank=1)
        assert logging.getLogger("pixio").getEffectiveLevel() == logging.WARNING
        assert not (tmp_path / "c" / "train.log").exists()
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        logging.getLogger("pixio").setLevel(logging.NOTSET)
