"""Atomic writes (a failed write leaves the previous file and no partial one) and rank-0 work in
a single process (two ranks: tests/evaluation/test_knn.py, test_two_ranks_...)."""

from __future__ import annotations

import errno

import pytest

from pixio.runtime.atomic import atomic_path, write_text_atomic
from pixio.runtime.config import ConfigError
from pixio.runtime.rank0 import _portable, rank0_result


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path):
    target = write_text_atomic(tmp_path / "results.json", "old\n")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]  # fmt: skip
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]  # fmt: skip


class _TwoArgs(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")


def test_rank0_result_in_one_process_and_errors_that_do_not_pickle_as_themselves():
    assert rank0_result(lambda: 41 + 1) == 42
    with pytest.raises(ConfigError, match="^output_dir: no"):
        rank0_result(lambda: (_ for _ in ()).throw(ConfigError("output_dir: no")))
    # What the other ranks get: the same error, or a RuntimeError naming its type and message.
    assert isinstance(_portable(ConfigError("x")), ConfigError)
    assert str(_portable(_TwoArgs("corrupt", "bad bytes"))) == "_TwoArgs: corrupt: bad bytes"
