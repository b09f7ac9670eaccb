"""SIGTERM to a pre-training run's whole process group, data-loader workers included (what
`timeout`, `kill -- -PGID` and SLURM send): the run saves the last completed iteration and exits
143, and the re-run ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from signal_helpers import assert_same_mae, finish, run_module, running
from test_pretrain_e2e import _overrides, web_shards  # noqa: F401 (web_shards: a fixture)

from pixio.runtime import checkpointing

pytestmark = pytest.mark.slow


def test_group_sigterm_with_workers_saves_and_the_rerun_equals_an_uninterrupted_run(
    request, tmp_path
):
    shards = request.getfixturevalue("web_shards")  # test_pretrain_e2e's, shared per module

    def overrides(out):
        return [*_overrides(shards, out), "data.num_workers=1"]

    part = tmp_path / "part"
    # Side by side: the uninterrupted run, and one whose group gets SIGTERM at the start of
    # iteration 4 (that step ends, the next batch is fetched, then the run stops).
    with running("pretraining.train", overrides(tmp_path / "full")) as full:
        stopped = run_module("pretraining.train", overrides(part), group_sigterm="train:4")
        assert stopped.returncode == 143, stopped.stdout[-2000:] + stopped.stderr[-3000:]
        assert "DataLoader worker" not in stopped.stderr  # the worker lived on
        assert "pre-empted (SIGTERM) at step 5: checkpoint saved" in stopped.stdout
        # The batch fetched after the signal (iteration 5) was not used: the loader's saved
        # position is handed back to where that batch starts.
        meta = checkpointing.read_meta(part / "checkpoint-last")
        assert meta["iteration"] == 5 and meta["data"][0]["iteration"] == 5

        resumed = run_module("pretraining.train", overrides(part))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming at iteration 5 with a fresh stream" not in resumed.stderr  # exact
        done = finish(full)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_mae(tmp_path / "full", part, 8)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
