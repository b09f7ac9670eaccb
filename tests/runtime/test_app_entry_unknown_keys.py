"""Every app's real Hydra entry point (`cli`, run in this process with a command line) refuses a
key its schema lacks, also when Hydra's `+` added it, in one line with exit code 2; a `+` into
a dict-typed field passes that check (the run stops later, on the unset dataset path, not on it)."""

from __future__ import annotations

import importlib
import logging
import sys

import pytest

APPS = ("pretraining.train", "distillation.train", "evaluation.depth", "evaluation.semseg", "evaluation.knn", "evaluation.linear")  # fmt: skip
UNKNOWN = "config error: train.epoch: unknown key (a '+' override adds it, but nothing reads it); "
DICT_ADDITIONS = {
    "distillation.train": "++student.overrides.pixio_vitt16={depth:1}",
    "evaluation.depth": "+encoder.model_kwargs.drop_path_rate=0",
    "evaluation.semseg": "+dataset.lr.extra=1e-4",
    "evaluation.knn": "+encoder.model_kwargs.drop_path_rate=0",
    "evaluation.linear": "+encoder.model_kwargs.drop_path_rate=0",
}
# The site path each app's data.root reads by default (configs/paths/): the first check after
# the unknown-key check, so a refusal naming it shows the `+` above passed.
DATA_PATH = {
    "distillation.train": "imagenet_wds",
    "evaluation.depth": "nyuv2",
    "evaluation.semseg": "ade20k",
    "evaluation.knn": "imagenet_folders",
    "evaluation.linear": "imagenet_folders",
}


def run_cli(module: str, args: list[str], tmp_path, monkeypatch, capsys) -> str:
    """`python -m <module> args...` in this process; it must exit 2. Returns stderr."""
    out = tmp_path / "out"
    argv = [module, *args, f"output_dir={out}", f"hydra.run.dir={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    handlers = list(logging.getLogger().handlers)  # Hydra configures logging: leave none behind
    try:
        with pytest.raises(SystemExit) as stop:
            importlib.import_module(module).cli()
    finally:
        logging.getLogger().handlers[:] = handlers
    assert stop.value.code == 2
    assert not out.exists() or not any(out.iterdir())  # nothing was started
    return capsys.readouterr().err


@pytest.mark.parametrize("module", APPS)
def test_a_key_added_with_plus_that_the_schema_lacks_is_refused(module, tmp_path, monkeypatch, capsys):  # fmt: skip
    err = run_cli(module, ["+train.epoch=1"], tmp_path, monkeypatch, capsys)
    closest = "the keys of train are batch_size, device, precision, cpu_threads" if module == "evaluation.knn" else "did you mean train.epochs?"  # fmt: skip
    assert err == f"{UNKNOWN}{closest}\n"


@pytest.mark.parametrize("module", sorted(DICT_ADDITIONS))
def test_a_key_added_to_a_dict_field_passes_the_check(module, tmp_path, monkeypatch, capsys):
    key = DATA_PATH[module]
    unset = f"paths.{key}=???"  # unset, whatever this machine's configs/local/paths.yaml says
    err = run_cli(module, [DICT_ADDITIONS[module], unset], tmp_path, monkeypatch, capsys)
    assert err.startswith(f"config error: paths.{key}: is not set (data.root is ${{paths.{key}}})")
    assert err.count("\n") == 1 and "unknown key" not in err
