"""What every app's entry refuses before anything is launched or created: a key of the other
launcher on the command line (`launcher.gpus=8` on a SLURM launch, a SLURM key on a local one),
`launcher=slurm` where no `sbatch` exists, and any refused config leaves no output_dir behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch_helpers import APPS, REPO, app_args, record_launches, run_app

from pixio.runtime.config import ConfigError, check_launcher
from pixio.runtime.launcher import LauncherConfig

SLURM_GPUS = (
    "config error: launcher.gpus: a key of the local launcher, but this run is submitted to SLURM"
    " ({why}): size a SLURM job with launcher.nodes and launcher.gpus_per_node, or add"
    " launcher=local to run on this machine\n"
)
LOCAL_NODES = (
    "config error: launcher.{key}: a key of the SLURM launcher, but this run runs on this machine"
    " ({why}): add launcher=slurm to submit it to SLURM, or set launcher.gpus for local processes\n"
)
NO_SBATCH = (
    "error: launcher=slurm, but sbatch is not on PATH: this machine cannot submit SLURM jobs (run"
    " from a SLURM login node, or add launcher=local to run here); nothing was submitted\n"
)


@pytest.mark.parametrize("module", APPS)
def test_a_local_key_on_a_slurm_launch_is_refused_and_nothing_is_created(module, tmp_path, monkeypatch, capsys):  # fmt: skip
    launched = record_launches(monkeypatch)
    args = [*app_args(tmp_path, module), "launcher=slurm", "launcher.gpus=8"]
    code, err = run_app(module, args, monkeypatch, capsys)
    assert (code, err) == (2, SLURM_GPUS.format(why="launcher=slurm"))
    assert launched == [] and not (tmp_path / "out").exists()  # Hydra's run folder included


@pytest.mark.parametrize("module", ["pretraining.train", "evaluation.knn"])
def test_a_slurm_key_on_a_local_launch_is_refused(module, tmp_path, monkeypatch, capsys):
    launched = record_launches(monkeypatch)
    args = [*app_args(tmp_path, module), "+launcher.partition=gpu"]
    code, err = run_app(module, args, monkeypatch, capsys)
    assert (code, err) == (2, LOCAL_NODES.format(key="partition", why="launcher=local, the default"))  # fmt: skip
    assert launched == [] and not (tmp_path / "out").exists()


def test_the_readme_example_names_the_experiment_that_selects_slurm(tmp_path, monkeypatch, capsys):
    launched = record_launches(monkeypatch)
    args = ["experiment=pretrain_vith16_imagenet", *app_args(tmp_path, "pretraining.train")]
    code, err = run_app("pretraining.train", [*args, "launcher.gpus=8"], monkeypatch, capsys)
    assert (code, err) == (2, SLURM_GPUS.format(why="experiment=pretrain_vith16_imagenet selects launcher=slurm"))  # fmt: skip
    # Run here instead: the experiment's own launcher.nodes (a config file, not the command
    # line) is no reason to refuse, and 8 local processes are what gets launched.
    code, err = run_app("pretraining.train", [*args, "launcher=local", "launcher.gpus=8"], monkeypatch, capsys)  # fmt: skip
    assert (code, err) == (0, "")
    ((cfg),) = launched
    assert (cfg.launcher.name, cfg.launcher.gpus, cfg.model.name) == ("local", 8, "pixio_vith16")


@pytest.mark.parametrize(
    ("node", "overrides", "message"),
    [
        (
            {"name": "slurm"},
            ["launcher.name=slurm", "+launcher.gpus=2"],
            SLURM_GPUS.format(why="launcher.name=slurm"),
        ),  # fmt: skip
        (
            {"name": "slurm"},
            ["launcher.gpus=2"],
            SLURM_GPUS.format(why="launcher=slurm in the config files"),
        ),  # fmt: skip
        (
            {"name": "local"},
            ["experiment=x", "launcher=local", "launcher.nodes=4"],
            LOCAL_NODES.format(key="nodes", why="launcher=local"),
        ),  # fmt: skip
        (
            {"name": "local"},
            ["~launcher.use_gpu"],
            LOCAL_NODES.format(key="use_gpu", why="launcher=local, the default"),
        ),  # fmt: skip
    ],
)
def test_check_launcher_names_the_key_and_what_chose_the_launcher(node, overrides, message):
    with pytest.raises(ConfigError) as err:
        check_launcher(node, overrides)
    assert f"config error: {err.value}\n" == message


def test_keys_of_the_chosen_launcher_and_other_overrides_pass():
    slurm = ["launcher=slurm", "launcher.nodes=2", "launcher.partition=gpu", "train.epochs=1"]
    assert check_launcher({"name": "slurm", "nodes": 2}, slurm) == LauncherConfig(name="slurm", nodes=2)  # fmt: skip
    assert check_launcher({"gpus": 4}, ["launcher.gpus=4", "hydra/launcher=basic"]).gpus == 4
    assert check_launcher({"name": "slurm", "gpus": 4}, []).gpus == 4  # no command line: no check


def test_no_sbatch_is_one_error_line_before_anything_is_created(tmp_path):
    """The real command line, in its own process, on a PATH without sbatch."""
    args = ["experiment=pretrain_vith16_imagenet", *app_args(tmp_path, "pretraining.train")]
    (tmp_path / "bin").mkdir()
    env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", "pretraining.train", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pretraining.train did not stop in 120 s: {exc.stderr}")
    assert (proc.returncode, proc.stderr) == (1, NO_SBATCH), proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", APPS[1:])
def test_no_sbatch_in_every_app(module, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    args = [*app_args(tmp_path, module), "launcher=slurm"]
    assert run_app(module, args, monkeypatch, capsys) == (1, NO_SBATCH)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", APPS)
def test_a_refused_config_leaves_no_output_dir(module, tmp_path, monkeypatch, capsys):
    """Hydra made its run folder, output_dir, before the check; now the job makes it."""
    code, err = run_app(module, [*app_args(tmp_path, module), "train.batch_size=0"], monkeypatch, capsys)  # fmt: skip
    assert (code, err) == (2, "config error: train.batch_size: must be positive, got 0\n")
    assert not (tmp_path / "out").exists()


def test_a_refused_sweep_job_leaves_no_output_dir(tmp_path, monkeypatch, capsys):
    args = [*app_args(tmp_path, "evaluation.depth")[:1], "encoder.checkpoint=missing.pth"]
    sweep = ["-m", "dataset=nyuv2", "head=dpt,linear", f"output_root={tmp_path / 'root'}", "logger=none"]  # fmt: skip
    code, err = run_app("evaluation.depth", [*sweep, *args], monkeypatch, capsys)
    assert code == 2 and err.startswith("config error: encoder.checkpoint: ")
    # Hydra records the sweep in output_root (multirun.yaml); the job's folder is not made.
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["multirun.yaml"]
