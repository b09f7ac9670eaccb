"""The depth and segmentation configs: every dataset x head and both demos compose and validate
with the reference hyper-parameters; a sweep gives each job its own output_dir; mistakes
stop with one `config error:` line naming the key (exit code 2) before anything is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from app_helpers import compose_eval
from config_helpers import UNKNOWN_EPOCH, refusal

from evaluation.common import check_sweep_output, resolve_sizes, swept_keys, validate_eval
from evaluation.encoder_config import encoder_patch_size
from pixio.runtime.config import ConfigError, check_known_keys
from pixio.runtime.launcher import validate_and_launch

REPO = Path(__file__).resolve().parents[2]
DEPTH = {"nyuv2": 4, "kitti": 4}  # dataset -> batch per GPU
SEMSEG = {"ade20k": 2, "pascal": 4, "loveda": 1}
LR = {"dpt": 1e-4, "linear": 2e-4}
LOVEDA_LR = {"dpt": 2e-4, "linear": 4e-4}


@pytest.fixture
def required(tmp_path) -> list[str]:
    """An existing (empty) data root and an existing checkpoint file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "encoder.pth").write_bytes(b"")
    return [f"data.root={tmp_path / 'data'}", f"encoder.checkpoint={tmp_path / 'encoder.pth'}"]


CELLS = [("depth", d, h) for d in DEPTH for h in LR]
CELLS += [("semseg", d, h) for d in SEMSEG for h in LR]


@pytest.mark.parametrize("app, dataset, head", CELLS)
def test_every_dataset_and_head_composes_with_the_reference_recipe(app, dataset, head, required):
    cfg = compose_eval(app, [f"dataset={dataset}", f"head={head}", *required])
    validate_eval(cfg, app)
    assert (cfg.dataset.name, cfg.head.name) == (dataset, head)
    assert cfg.optim.lr == (LOVEDA_LR if dataset == "loveda" else LR)[head]
    assert cfg.train.batch_size == {**DEPTH, **SEMSEG}[dataset]
    o, t = cfg.optim, cfg.train
    assert (list(o.betas), o.weight_decay, o.schedule, o.poly_power) == ([0.9, 0.999], 0.01, "poly", 0.9)  # fmt: skip
    assert o.warmup_fraction == (0.1 if app == "depth" else 0.0)
    assert (t.epochs, t.precision, t.iters_per_epoch, t.val_every) == (60, "bf16", None, 1)
    # Sizes follow the encoder's patch: the reference's 256 / 256 / 170 for a patch-16 encoder.
    assert (cfg.data.crop_size, cfg.eval.window, cfg.eval.stride) == (None, None, None)
    assert resolve_sizes(cfg, encoder_patch_size(cfg.encoder))["as_reference"]
    assert (cfg.data.crop_size, cfg.eval.window, cfg.eval.stride) == (256, 256, 170)
    assert (cfg.launcher.gpus_per_node, cfg.launcher.job_name) == (8, "pixio-eval")
    assert cfg.output_dir == f"outputs/eval/pixio_vith16/{dataset}_{head}"


@pytest.mark.parametrize("app", ["depth", "semseg"])
def test_demo_experiment_composes_and_validates(app, tmp_path):
    cfg = compose_eval(app, [f"experiment={app}_demo", f"data.root={tmp_path / 'absent'}"])
    validate_eval(cfg, app)  # the demo builds its data, and may run on random weights
    assert cfg.data.build_demo and cfg.encoder.random_if_missing
    assert (cfg.train.device, cfg.train.precision, cfg.logger.name) == ("cpu", "fp32", "none")


@pytest.mark.parametrize(
    "app, overrides, key",
    [
        ("depth", ["dataset=ade20k"], "dataset"),
        ("semseg", ["dataset=kitti"], "dataset"),
        ("depth", ["dataset.name=cityscapes"], "dataset.name"),
        ("depth", ["head.name=mlp"], "head.name"),
        ("depth", ["eval.window=100"], "eval.window"),
        ("depth", ["eval.window_batch=0"], "eval.window_batch"),
        ("semseg", ["data.label_format=png"], "data.label_format"),
        ("semseg", ["data.train_split=/no/such/list.txt"], "data.train_split"),
        ("depth", ["optim.warmup_fraction=1.5"], "optim.warmup_fraction"),
    ],
)
def test_bad_values_name_their_key(app, overrides, key, required):
    cfg = compose_eval(app, [*required, *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate_eval(cfg, app)


def test_missing_data_root_and_checkpoint_are_refused(tmp_path, required):
    cfg = compose_eval("depth", [required[1], f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="^data.root: .* does not exist"):
        validate_eval(cfg, "depth")
    cfg = compose_eval("depth", [required[0], f"encoder.checkpoint={tmp_path / 'none.pth'}"])
    with pytest.raises(ConfigError, match="^encoder.checkpoint: not found"):
        validate_eval(cfg, "depth")


def test_a_sweep_varies_dataset_and_head_only_and_never_pins_output_dir():
    argv = ["-m", "dataset=nyuv2,kitti", "head=glob(*)", "optim.betas=[0.9,0.99]", "x='a,b'"]
    assert swept_keys(argv) == ["dataset", "head"]
    assert swept_keys(["train.seed=range(3)", "+optim.lr=1e-4,2e-4"]) == ["train.seed", "optim.lr"]
    check_sweep_output(["dataset=kitti", "output_dir=/x"], False, ["train.seed"])  # not a sweep
    check_sweep_output(["dataset=kitti", "output_root=/x"], True, ["dataset", "head"])
    with pytest.raises(ConfigError, match="^output_dir: is set for a sweep"):
        check_sweep_output(["dataset=kitti", "output_dir=/x"], True, ["dataset"])
    with pytest.raises(ConfigError, match="^train.seed: a sweep .* may vary dataset and head only"):
        check_sweep_output(["train.seed=1"], True, ["head", "train.seed"])


def test_cli_config_error_is_one_line_with_exit_code_2(tmp_path, required):
    root, out = tmp_path / "root", tmp_path / "sweep"
    cmd = [sys.executable, "-m", "evaluation.depth", "-m", *required, "head=dpt,linear",
           f"output_root={root}", f"output_dir={out}"]  # fmt: skip
    sweep = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 2
    assert sweep.stderr.strip() == (
        "config error: output_dir: is set for a sweep (-m): set output_root instead (each job "
        "writes output_root/<dataset>_<head>)"
    )
    assert not out.exists() and not list(root.rglob("train.log"))  # nothing was started


@pytest.mark.parametrize("app", ["depth", "semseg"])
def test_unknown_plus_keys_are_refused_by_the_app_entry(app, required, tmp_path, capsys):
    validate = lambda cfg: validate_eval(cfg, app)  # noqa: E731 (what cli_main validates)
    assert refusal(compose_eval(app, [*required, "+train.epoch=1"]), validate, capsys) == UNKNOWN_EPOCH  # fmt: skip
    line = refusal(compose_eval(app, [*required, "+data.label_fromat=raw"]), validate, capsys)
    assert line.startswith("config error: data.label_fromat: unknown key")
    assert line.endswith("did you mean data.label_format?\n")
    # A dict-typed field takes new keys: the entry goes on to run main.
    cfg = compose_eval(app, [*required, "+dataset.lr.extra=3e-4", f"output_dir={tmp_path / 'o'}"])
    assert validate_and_launch(lambda c: c.dataset.lr.extra, cfg, validate) == 3e-4


def test_knn_refuses_unknown_plus_keys_and_takes_model_kwargs(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from evaluation.knn import CONFIG_DIR, validate_knn

    def config(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            return compose("eval_knn", [f"data.root={tmp_path}", f"output_dir={tmp_path}", *overrides])  # fmt: skip

    assert refusal(config("+train.epoch=1"), validate_knn, capsys) == (
        "config error: train.epoch: unknown key (a '+' override adds it, but nothing reads it); "
        "the keys of train are batch_size, device, precision, cpu_threads\n"  # k-NN has no epochs
    )
    line = refusal(config("+knn.temprature=0.1"), validate_knn, capsys)
    assert line.startswith("config error: knn.temprature: unknown key")
    assert line.endswith("did you mean knn.temperature?\n")
    cfg = config("encoder.source=timm", "+encoder.model_kwargs.drop_path_rate=0")
    check_known_keys(cfg)  # a dict field: its keys are the model's to check (baselines)
    assert cfg.encoder.model_kwargs.drop_path_rate == 0
