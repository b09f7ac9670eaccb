"""What every app's Hydra entry (`validate_and_launch`) says about a composed config, in-process:
the one `config error:` line and exit code 2, or that it went on to run `main`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pixio.runtime.launcher import validate_and_launch


def _must_not_run(cfg: Any) -> None:
    raise AssertionError("main ran although the config should have been refused")


def refusal(cfg: Any, validate: Callable[[Any], Any], capsys: pytest.CaptureFixture) -> str:
    """The stderr of `validate_and_launch(main, cfg, validate)`, which must exit 2 before `main`."""
    capsys.readouterr()  # drop what composing printed
    with pytest.raises(SystemExit) as stop:
        validate_and_launch(_must_not_run, cfg, validate)
    assert stop.value.code == 2
    return capsys.readouterr().err


UNKNOWN_EPOCH = (
    "config error: train.epoch: unknown key (a '+' override adds it, but nothing reads it); "
    "did you mean train.epochs?\n"
)
