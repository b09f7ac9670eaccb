"""`--help`, `--cfg job` and a config error return before any heavy library is imported: each
app runs in a subprocess that reports, as it exits, which of them `sys.modules` holds (the time
they take is in docs/performance.md, "Fast command lines"; a test asserts the import set, not a
duration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
HEAVY = ("torch", "torchvision", "timm", "transformers", "webdataset", "submitit", "matplotlib", "wandb")  # fmt: skip

# Runs `python -m <module> <args>` and writes the heavy modules loaded at exit to argv[1].
REPORT = f"""
import atexit, json, runpy, sys
out, module = sys.argv[1], sys.argv[2]
heavy = {HEAVY!r}
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(m for m in heavy if m in sys.modules))))
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

CASES = {
    "pretraining.train": [
        ["--help"],
        ["experiment=demo", "--cfg", "job"],
        ["experiment=demo", "train.batch_size=0"],
        ["experiment=demo", "model.name=pixio_vitx16"],
        ["experiment=demo", "+train.epoch=1"],
        ["experiment=demo", "train.cpu_threads=0"],
        ["experiment=demo", "data.build_demo=false", "data.root=/nonexistent/shards"],
    ],
    "distillation.train": [
        ["--help"],
        ["experiment=distill_demo", "--cfg", "job"],
        ["experiment=distill_demo", "train.batch_size=0"],
        ["experiment=distill_demo", "students=[pixio_vitx16]"],
        ["experiment=distill_demo", "loss.cls=huber"],
        ["experiment=distill_demo", "mask_ratio=1.5"],
    ],
}
PARAMS = [(app, args) for app, runs in CASES.items() for args in runs]


@pytest.mark.parametrize(("app", "args"), PARAMS, ids=[f"{a}:{' '.join(r)}" for a, r in PARAMS])
def test_help_cfg_and_config_errors_load_no_heavy_library(tmp_path: Path, app: str, args: list[str]) -> None:  # fmt: skip
    out = tmp_path / "heavy.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", REPORT, str(out), app, f"hydra.run.dir={tmp_path}", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{app} {args} did not return within {TIMEOUT_S} s")
    if "--help" not in args and "--cfg" not in args:  # a config error: one line, exit 2
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith("config error: "), done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert ("Powered by Hydra" in done.stdout) if "--help" in args else ("train:" in done.stdout)  # fmt: skip
    assert json.loads(out.read_text()) == [], f"{app} {args} imported heavy libraries"
