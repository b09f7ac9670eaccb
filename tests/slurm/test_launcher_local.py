"""pixio.runtime.launcher without a cluster: config validation, the in-process and torchrun paths,
and what the SLURM path would submit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import submitit
from omegaconf import OmegaConf

from pixio.runtime import launcher
from pixio.runtime.distributed import read_dist_env
from pixio.runtime.launcher import (
    LauncherConfig,
    SubmititMain,
    launch,
    launcher_config,
    slurm_parameters,
    torchrun_command,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _cfg(tmp_path, **launcher_kw):
    return OmegaConf.create(
        {"output_dir": str(tmp_path / "run"), "launcher": {"name": "local", **launcher_kw}}
    )


def test_every_field_has_a_default_and_structured_config_works() -> None:
    node = OmegaConf.structured(LauncherConfig)
    assert launcher_config(node) == LauncherConfig()
    assert launcher_config(None) == LauncherConfig()
    assert launcher_config({"name": "slurm", "nodes": 16}).nodes == 16


@pytest.mark.parametrize(
    ("node", "key"),
    [
        ({"name": "cloud"}, "launcher.name"),
        ({"gpus": 0}, "launcher.gpus"),
        ({"nodes": -1}, "launcher.nodes"),
        ({"cpus_per_task": 0}, "launcher.cpus_per_task"),
        ({"mem_gb": 0}, "launcher.mem_gb"),
        ({"max_num_timeout": -1}, "launcher.max_num_timeout"),
        ({"timeout_min": 1, "signal_delay_s": 60}, "launcher.signal_delay_s"),
        ({"timeout_min": 2, "signal_delay_s": 60}, "launcher.signal_delay_s"),  # may come at 0 s
        ({"gpu": 8}, "launcher.gpu"),  # typo: unknown key
    ],
)
def test_bad_values_name_the_key(node: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}:"):
        launcher_config(node)


def test_local_runs_main_in_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: pytest.fail("spawned"))
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    cfg = _cfg(tmp_path)
    seen = []
    assert launch(lambda c: seen.append(c) or 42, cfg, []) == 42
    assert seen == [cfg]


def test_inside_torchrun_does_not_spawn_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: pytest.fail("spawned"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch(lambda c: "worker", _cfg(tmp_path, gpus=2), []) == "worker"


def test_torchrun_command_line() -> None:
    cmd = torchrun_command(4, ["model=vitl16", "output_dir=old"], "pretraining.train", "/o/x y")
    assert cmd == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "pretraining.train",
        "model=vitl16",
        "output_dir='/o/x y'",  # pinned to the parent's resolved value, quoted for Hydra
    ]
    assert torchrun_command(2, ["a=1"], "m", "/plain/dir")[-1] == "output_dir=/plain/dir"


def test_multi_gpu_local_spawns_torchrun(tmp_path, monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    ran = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: SimpleNamespace(args=cmd))
    monkeypatch.setattr(launcher, "wait_through_signals", lambda child: ran.append(child.args) or 3)
    with pytest.raises(SystemExit) as exit_info:  # the workers' failure is the run's failure
        launch(lambda c: pytest.fail("ran in process"), _cfg(tmp_path, gpus=3), ["x=1"])
    assert exit_info.value.code == 3
    (cmd,) = ran
    assert cmd[3:5] == ["--standalone", "--nproc_per_node=3"]
    assert cmd[-2:] == ["x=1", f"output_dir={tmp_path / 'run'}"]


def test_two_local_processes_through_real_torchrun(tmp_path, job_env) -> None:
    out = tmp_path / "run"
    args = ["launcher=local", "launcher.gpus=2", f"output_dir={out}", "fake.steps=3"]
    proc = subprocess.run(
        [sys.executable, "-m", "fake_train", *args],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--nproc_per_node=2 -m fake_train" in proc.stdout
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["mean_rank"]) for r in reports] == [
        (0, 2, 0.5),
        (1, 2, 0.5),
    ]
    assert json.loads((out / "done.json").read_text())["steps"] == 3


def test_slurm_parameters_one_task_per_gpu() -> None:
    lc = launcher_config(
        {"name": "slurm", "nodes": 16, "gpus_per_node": 8, "partition": "learn", "account": "pixio"}
    )
    params = slurm_parameters(lc)
    assert params["nodes"] == 16 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["cpus_per_task"] == 10 and params["slurm_signal_delay_s"] == 120
    assert params["slurm_partition"] == "learn" and params["slurm_account"] == "pixio"
    assert params["slurm_additional_parameters"] == {"requeue": True}
    assert "slurm_qos" not in params and "mem_gb" not in params  # unset: cluster defaults

    cpu = slurm_parameters(launcher_config({"gpus_per_node": 2, "use_gpu": False, "mem_gb": 4}))
    assert "gpus_per_node" not in cpu and cpu["tasks_per_node"] == 2 and cpu["mem_gb"] == 4


def test_submitit_task_reads_its_rank_from_the_step(monkeypatch) -> None:
    # A submitit task is an srun step: main() gets its rank the way any SLURM task does, and
    # nothing is exported before (CUDA_VISIBLE_DEVICES stays as the cluster set it).
    slurm = dict(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="31337",
        SLURM_STEP_ID="0",
        SLURM_PROCID="5",
        SLURM_NTASKS="8",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu[007-008]",
        CUDA_VISIBLE_DEVICES="0,1,2,3",
    )
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    # Left in the submitting shell (sbatch passes them on): the step's own values must win.
    stale = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1")
    for key, value in stale.items():
        monkeypatch.setenv(key, value)  # restored after the test
    got = SubmititMain(lambda cfg: read_dist_env(), OmegaConf.create({}))()
    assert (got.rank, got.world_size, got.local_rank, got.source) == (5, 8, 1, "slurm")
    assert got.master_addr == "gpu007"
    assert not any(key in os.environ for key in dist_vars)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert launcher.under_process_launcher()  # launch() in the task runs main in process


def test_checkpoint_resubmits_a_fresh_copy(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    job = SubmititMain(len, cfg)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, SubmititMain) and delayed.function is not job
    assert delayed.function.main is len and delayed.function.cfg == cfg
    assert delayed.args == () and delayed.kwargs == {}
