"""What a SLURM task of a `launcher=slurm` run executes (`pixio.runtime.launcher.submit_slurm`
pickles it); in its own module so that the launcher, which every config check imports, does
not import submitit."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import submitit
from omegaconf import DictConfig

INHERITED_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class SubmititMain(submitit.helpers.Checkpointable):
    """The callable a SLURM task runs: ``main(cfg)``, which takes its rank from the srun step's
    variables like any SLURM task (``pixio.runtime.distributed.read_dist_env``).

    ``checkpoint()`` (called by submitit on rank 0 when the job requeues itself) resubmits a fresh
    copy: the training state lives in ``output_dir``'s checkpoint, which the trainer resumes from.
    """

    def __init__(self, main: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
        self.main = main
        self.cfg = cfg

    def __call__(self) -> Any:
        # sbatch hands the job the submitting shell's environment: rendez-vous variables left
        # there (a torchrun session, an exported MASTER_ADDR=localhost) would override the
        # step's own and hang a multi-node job, so inside a submitit task the step decides.
        for key in INHERITED_RENDEZVOUS:
            os.environ.pop(key, None)
        return self.main(self.cfg)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.main, self.cfg))
