"""Every launch script under scripts/: it parses (`bash -n`), and its dry run (DRY_RUN=1) prints
the exact command it would run and runs nothing; the printed command then goes through the app's
real entry in this process, where it passes the config check and would submit the job shown.

PYTHON, srun, sbatch and squeue are stubs that record any call, so a dry run that ran something
fails the test instead of reaching a cluster."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from launch_helpers import REPO, record_launches, record_submissions, run_app

from pixio.runtime.launcher import LauncherConfig

SCRIPTS = sorted([*REPO.glob("scripts/**/*.sh"), *REPO.glob("scripts/**/*.sbatch")])
CLUSTER = {"PARTITION": "gpu", "ACCOUNT": "proj", "QOS": "high", "CONSTRAINT": "h100", "TIME_MIN": "600"}  # fmt: skip
CLUSTER_ARGS = ["launcher.partition=gpu", "launcher.account=proj", "launcher.qos=high", "launcher.constraint=h100", "launcher.timeout_min=600"]  # fmt: skip
STUB = '#!/bin/sh\necho "$0 $*" >> "{log}"\nexit 3\n'


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """An environment with nothing of the caller's launch variables; PYTHON and the SLURM clients
    are stubs logging to tmp_path/ran.log; data folders and a checkpoint exist under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python-stub", "srun", "sbatch", "squeue"):
        (bin_dir / name).write_text(STUB.format(log=tmp_path / "ran.log"))
        (bin_dir / name).chmod(0o755)
    for folder in (
        "in1k",
        "web",
        "web-json",
        "out",
        "eval/kitti",
        "imagenet/train",
        "imagenet/val",
    ):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for dataset in ("nyuv2", "ade20k", "pascal", "loveda"):
        (tmp_path / "eval" / dataset).mkdir()
    (tmp_path / "teacher.pth").touch()
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return {"PATH": path, "HOME": str(tmp_path), "PYTHON": str(bin_dir / "python-stub"), "DRY_RUN": "1"}  # fmt: skip


def dry_run(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """The commands a script prints under DRY_RUN (each "dry run: ..." line, split as a shell
    would); the script must exit 0 and run nothing."""
    try:
        proc = subprocess.run(["bash", str(REPO / script), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not finish its dry run in 60 s: {exc.stdout}")
    assert proc.returncode == 0, proc.stderr
    ran = Path(env["HOME"]) / "ran.log"
    assert not ran.exists(), f"the dry run ran {ran.read_text()}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("dry run: ")]
    return [shlex.split(line.removeprefix("dry run: ")) for line in lines]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_scripts_without_their_data_name_the_variable(sandbox):
    for script, variable in [
        ("scripts/pretrain_vith16_imagenet.sh", "DATA_ROOT"),
        ("scripts/distill_vitl16_vitb16_web.sh", "TEACHER_CKPT"),
        ("scripts/slurm/pretrain.sbatch", "DATA_ROOT"),
    ]:
        proc = subprocess.run(["bash", script], env=sandbox, cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode != 0 and f"{variable}: set {variable} to the" in proc.stderr, script


def recipe(module: str, experiment: str, nodes: int, env: dict[str, str], *data: str) -> list[str]:
    """The command a recipe script runs (the order the script gives, then CLUSTER_ARGS, then the
    extra overrides)."""
    shape = ["launcher=slurm", f"launcher.nodes={nodes}", "launcher.gpus_per_node=8", "launcher.cpus_per_task=10", "train.batch_size=64"]  # fmt: skip
    return [env["PYTHON"], "-m", module, f"experiment={experiment}", *shape, *data]


PRETRAIN = [
    ("scripts/pretrain_vith16_imagenet.sh", "pretrain_vith16_imagenet", 16, "pixio_vith16", False),
    ("scripts/pretrain_vit5b16_web.sh", "pretrain_vit5b16_web", 32, "pixio_vit5b16", True),
]


@pytest.mark.parametrize(("script", "experiment", "nodes", "model", "web"), PRETRAIN)
def test_pretraining_scripts_dry_run(script, experiment, nodes, model, web, sandbox, tmp_path, monkeypatch, capsys):  # fmt: skip
    env = {**sandbox, **CLUSTER, "DATA_ROOT": str(tmp_path / ("web" if web else "in1k")), "OUTPUT_DIR": str(tmp_path / "out/run")}  # fmt: skip
    data = [f"data.root={env['DATA_ROOT']}"]
    if web:
        env["JSON_ROOT"] = str(tmp_path / "web-json")
        data.append(f"data.json_root={env['JSON_ROOT']}")
    (command,) = dry_run(script, env, "train.max_iters=10")
    expected = recipe("pretraining.train", experiment, nodes, env, *data, f"output_dir={tmp_path / 'out/run'}")  # fmt: skip
    assert command == [*expected, *CLUSTER_ARGS, "train.max_iters=10"]

    submitted = record_submissions(monkeypatch)
    assert run_app(command[2], command[3:], monkeypatch, capsys) == (0, "")
    ((cfg, lc),) = submitted
    assert lc == LauncherConfig(name="slurm", nodes=nodes, gpus_per_node=8, cpus_per_task=10, timeout_min=600, partition="gpu", account="proj", qos="high", constraint="h100")  # fmt: skip
    assert (cfg.model.name, cfg.train.batch_size * nodes * 8) == (model, 64 * 8 * nodes)
    assert (cfg.train.max_iters, cfg.output_dir) == (10, str(tmp_path / "out/run"))
    assert not (tmp_path / "out/run").exists()


DISTILL = [
    (
        "distill_vit1b16_vith16_imagenet",
        "distill_vit5b16_to_vit1b16_vith16_imagenet",
        ["pixio_vit1b16", "pixio_vith16"],
    ),  # fmt: skip
    (
        "distill_vit1b16_vith16_web",
        "distill_vit5b16_to_vit1b16_vith16_web",
        ["pixio_vit1b16", "pixio_vith16"],
    ),  # fmt: skip
    (
        "distill_vitl16_vitb16_imagenet",
        "distill_vit5b16_to_vitl16_vitb16_imagenet",
        ["pixio_vitl16", "pixio_vitb16"],
    ),  # fmt: skip
    (
        "distill_vitl16_vitb16_web",
        "distill_vit5b16_to_vitl16_vitb16_web",
        ["pixio_vitl16", "pixio_vitb16"],
    ),  # fmt: skip
]


@pytest.mark.parametrize(("script", "experiment", "students"), DISTILL)
def test_distillation_scripts_dry_run(script, experiment, students, sandbox, tmp_path, monkeypatch, capsys):  # fmt: skip
    web = script.endswith("_web")
    env = {**sandbox, "TEACHER_CKPT": str(tmp_path / "teacher.pth"), "DATA_ROOT": str(tmp_path / ("web" if web else "in1k")), "PARTITION": "gpu"}  # fmt: skip
    if web:
        env["JSON_ROOT"] = str(tmp_path / "web-json")
    (command,) = dry_run(f"scripts/{script}.sh", env)
    data = [f"teacher.checkpoint={tmp_path / 'teacher.pth'}", f"data.root={env['DATA_ROOT']}", f"output_dir=outputs/{experiment}"]  # fmt: skip
    data += [f"data.json_root={tmp_path / 'web-json'}"] if web else []
    assert command == [*recipe("distillation.train", experiment, 16, env, *data), "launcher.partition=gpu"]  # fmt: skip

    submitted = record_submissions(monkeypatch)
    args = [*command[3:], f"output_dir={tmp_path / 'out/distill'}"]  # not under the checkout
    assert run_app(command[2], args, monkeypatch, capsys) == (0, "")
    ((cfg, lc),) = submitted
    assert (lc.name, lc.nodes, lc.gpus_per_node, lc.partition) == ("slurm", 16, 8, "gpu")
    assert (cfg.teacher.name, list(cfg.students)) == ("pixio_vit5b16", students)
    assert cfg.data.kind == ("web" if web else "imagenet")


def test_the_sbatch_file_dry_run(sandbox, tmp_path, monkeypatch, capsys):
    """Run with bash as sbatch runs its copy: from the submission folder, with SLURM's variables."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu[001-016]", "SLURM_NNODES": "16", "SLURM_NTASKS": "128", "SLURM_RESTART_COUNT": "1"}  # fmt: skip
    env = {**sandbox, **slurm, "DATA_ROOT": str(tmp_path / "in1k"), "OUTPUT_DIR": str(tmp_path / "out/run")}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/slurm/pretrain.sbatch", "train.max_iters=10"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and not (tmp_path / "ran.log").exists(), proc.stderr
    head, line = proc.stdout.splitlines()
    assert head == "[pixio] job 4242 (restart 1) on gpu[001-016]"
    command = shlex.split(line.removeprefix("dry run: "))
    run = ["srun", "--kill-on-bad-exit=1", env["PYTHON"], "-u", "-m", "pretraining.train"]
    overrides = ["experiment=pretrain_vith16_imagenet", "launcher=local", "train.batch_size=64", f"data.root={tmp_path / 'in1k'}", f"output_dir={tmp_path / 'out/run'}", "train.max_iters=10"]  # fmt: skip
    assert command == [*run, *overrides]

    launched = record_launches(monkeypatch)  # each srun task: one rank, in process
    assert run_app("pretraining.train", overrides, monkeypatch, capsys) == (0, "")
    ((cfg),) = launched
    assert (cfg.launcher.name, cfg.launcher.gpus, cfg.model.name) == ("local", 1, "pixio_vith16")

    env.pop("SLURM_JOB_ID"), env.pop("DRY_RUN")  # by hand, outside a job: refused
    proc = subprocess.run(["bash", "scripts/slurm/pretrain.sbatch"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "error: not inside a SLURM job: submit this file with sbatch" in proc.stderr  # fmt: skip
    assert not (tmp_path / "ran.log").exists()


def test_run_all_evals_dry_run(sandbox, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "teacher.pth"
    env = {**sandbox, "EVAL_DATA": str(tmp_path / "eval"), "IMAGENET_ROOT": str(tmp_path / "imagenet"), "PARTITION": "gpu", "KNN_ARGS": "knn.k=[10]", "LINEAR_ARGS": "head.lrs=[0.05,0.1]"}  # fmt: skip
    out = tmp_path / "out/eval"
    commands = dry_run("scripts/run_all_evals.sh", env, "pixio_vith16", str(ckpt), str(out), "logger=none")  # fmt: skip
    common = ["launcher=slurm", "encoder.name=pixio_vith16", f"encoder.checkpoint={ckpt}", "launcher.partition=gpu"]  # fmt: skip
    expected = []
    for dataset, app in [("nyuv2", "depth"), ("kitti", "depth"), ("ade20k", "semseg"), ("pascal", "semseg"), ("loveda", "semseg")]:  # fmt: skip
        sweep = ["-m", f"dataset={dataset}", "head=dpt,linear", f"data.root={tmp_path / 'eval' / dataset}"]  # fmt: skip
        expected.append([env["PYTHON"], "-m", f"evaluation.{app}", *sweep, f"output_root={out}", *common, "logger=none"])  # fmt: skip
    knn = [f"data.root={tmp_path / 'imagenet'}", f"output_dir={out}/knn", *common, "knn.k=[10]", "logger=none"]  # fmt: skip
    expected.append([env["PYTHON"], "-m", "evaluation.knn", *knn])
    probe = ["experiment=linear_imagenet", f"data.root={tmp_path / 'imagenet'}", f"output_dir={out}/linear", *common, "head.lrs=[0.05,0.1]", "logger=none"]  # fmt: skip
    expected.append([env["PYTHON"], "-m", "evaluation.linear", *probe])
    expected.append([env["PYTHON"], "-m", "evaluation.report", str(out)])
    assert commands == expected

    submitted = record_submissions(monkeypatch)
    for command in commands[:-1]:
        assert run_app(command[2], command[3:], monkeypatch, capsys) == (0, ""), command

    def what(cfg) -> tuple:
        if "dataset" in cfg:
            return (cfg.dataset.name, cfg.head.name)
        return ("linear", list(cfg.head.lrs)) if "linear" in cfg else ("knn", None)

    runs = [(*what(cfg), cfg.output_dir) for cfg, _ in submitted]
    pairs = [(d, h) for d in ("nyuv2", "kitti", "ade20k", "pascal", "loveda") for h in ("dpt", "linear")]  # fmt: skip
    assert runs == [(d, h, f"{out}/{d}_{h}") for d, h in pairs] + [("knn", None, f"{out}/knn"), ("linear", [0.05, 0.1], f"{out}/linear")]  # fmt: skip
    assert {(lc.name, lc.partition, lc.gpus_per_node) for _, lc in submitted} == {("slurm", "gpu", 8)}  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["multirun.yaml"]  # Hydra's record; no job folder


def test_run_all_evals_usage_and_default_python(sandbox, tmp_path):
    proc = subprocess.run(["bash", "scripts/run_all_evals.sh"], env=sandbox, cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "# The full frozen-encoder evaluation of one encoder" in proc.stderr  # fmt: skip
    assert "experiment=baseline_mae_vith14); docs/evaluation.md, Baselines." in proc.stderr
    env = {k: v for k, v in sandbox.items() if k != "PYTHON"}
    env.update(EVAL_DATA=str(tmp_path / "eval"), IMAGENET_ROOT=str(tmp_path / "imagenet"))
    commands = dry_run("scripts/run_all_evals.sh", env, "pixio_vitl16", "ck.pth")
    venv = REPO / ".venv" / "bin" / "python"
    python = str(venv) if os.access(venv, os.X_OK) else "python"
    assert {c[0] for c in commands} == {python}
    nyuv2 = ["-m", "dataset=nyuv2", "head=dpt,linear", f"data.root={tmp_path / 'eval/nyuv2'}"]
    common = ["launcher=slurm", "encoder.name=pixio_vitl16", "encoder.checkpoint=ck.pth"]
    assert commands[0] == [python, "-m", "evaluation.depth", *nyuv2, "output_root=outputs/eval/pixio_vitl16", *common]  # fmt: skip


def test_local_cluster_usage_and_status(tmp_path):
    script = str(REPO / "scripts/slurm/local_cluster.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr == f"usage: {script} start|stop|status\n"
    env = {**os.environ, "PIXIO_SLURM_STATE": str(tmp_path / "state")}
    proc = subprocess.run(["bash", script, "status"], env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    names = ("munged", "slurmctld", "slurmd")
    assert proc.returncode == 1 and proc.stdout == "".join(f"[local_cluster] {n} not running\n" for n in names)  # fmt: skip
