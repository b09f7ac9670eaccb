"""Run a job's ``main(cfg)`` here, under torchrun, or as a SLURM job submitted with submitit.

``launch(main, cfg, overrides)`` reads ``cfg.launcher`` (a ``LauncherConfig``):

- ``name=local``, ``gpus<=1`` (or already inside torchrun / a multi-task srun step): ``main(cfg)``
  in this process.
- ``name=local``, ``gpus>1``: re-runs the entry module under ``torchrun --standalone`` with the same
  Hydra overrides; each worker then takes the in-process path.
- ``name=slurm``: submits ``SubmititMain(main, cfg)`` (one task per GPU), prints the job id and log
  path, and returns the submitit job. The job requeues itself on the time-limit signal, see
  ``pixio.runtime.preemption``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pixio._lazy import lazy_exports
from pixio.runtime.threads import NUM_THREADS_ENV, mark_default

# Loaded only on use (submitit, torch): a config check and --help import this module.
__getattr__, _ = lazy_exports(__name__, {"SubmititMain": "pixio.runtime.slurm_job"})


@dataclasses.dataclass
class LauncherConfig:
    """The ``launcher`` config group."""

    name: str = "local"  # "local" (this machine) or "slurm" (submit through submitit)
    gpus: int = 1  # local: processes on this machine; > 1 spawns torchrun
    nodes: int = 1  # slurm: number of nodes
    gpus_per_node: int = 8  # slurm: GPUs per node = tasks per node (one task per GPU)
    cpus_per_task: int = 10  # slurm: CPUs per task (data-loader workers + the trainer)
    mem_gb: float | None = None  # slurm: memory per node in GB; None = the partition's default
    timeout_min: int = 2880  # slurm: time limit of each run; the job requeues itself after it
    partition: str | None = None  # slurm: partition (sbatch --partition)
    account: str | None = None  # slurm: account charged for the job (sbatch --account)
    qos: str | None = None  # slurm: quality of service (sbatch --qos)
    constraint: str | None = None  # slurm: node features, e.g. "h100" (sbatch --constraint)
    comment: str | None = None  # slurm: free-text comment (sbatch --comment)
    signal_delay_s: int = 120  # slurm: SIGUSR2 this many seconds before the time limit
    max_num_timeout: int = 20  # slurm: how many time-limit requeues are allowed
    folder: str | None = None  # slurm: job folder (logs, pickles); None = <output_dir>/slurm/%j
    use_gpu: bool = True  # slurm: request GPUs; False runs the tasks on CPU-only nodes
    job_name: str = "pixio"  # slurm: job name shown by squeue


# Which launcher reads which key (the rest of the name comments above): a key of the other
# launcher given on the command line would be silently ignored, so `check_launcher_keys` refuses it.
LOCAL_KEYS = ("gpus",)
SLURM_KEYS = tuple(
    f.name for f in dataclasses.fields(LauncherConfig) if f.name not in ("name", *LOCAL_KEYS)
)


class SlurmUnavailableError(RuntimeError):
    """`launcher=slurm` on a machine without the SLURM client (no `sbatch` on PATH)."""


def launcher_config(node: Any) -> LauncherConfig:
    """Validated ``LauncherConfig`` from a config node (DictConfig, dict, dataclass or None)."""
    if node is None:
        return LauncherConfig()
    if isinstance(node, LauncherConfig):
        node = dataclasses.asdict(node)
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    known = {f.name for f in dataclasses.fields(LauncherConfig)}
    for key in node:
        if key not in known:
            raise ValueError(f"launcher.{key}: unknown key (known: {', '.join(sorted(known))})")
    cfg = LauncherConfig(**node)
    if cfg.name not in ("local", "slurm"):
        raise ValueError(f"launcher.name: must be 'local' or 'slurm', got {cfg.name!r}")
    for key in ("gpus", "nodes", "gpus_per_node", "cpus_per_task", "timeout_min"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            raise ValueError(
                f"launcher.{key}: must be a positive integer, got {getattr(cfg, key)!r}"
            )
    for key in ("signal_delay_s", "max_num_timeout"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 0:
            raise ValueError(f"launcher.{key}: must be an integer >= 0, got {getattr(cfg, key)!r}")
    if cfg.mem_gb is not None and cfg.mem_gb <= 0:
        raise ValueError(f"launcher.mem_gb: must be positive or null, got {cfg.mem_gb!r}")
    # SLURM sends the signal up to 60 s earlier than asked (its timer's resolution): a job whose
    # signal can land before the handlers are installed would be killed instead of requeued.
    if cfg.signal_delay_s + 60 >= cfg.timeout_min * 60:
        raise ValueError(
            f"launcher.signal_delay_s: {cfg.signal_delay_s} must leave more than 60 s of"
            f" launcher.timeout_min={cfg.timeout_min} (SLURM may signal up to 60 s early)"
        )
    return cfg


def override_key(override: str) -> str:
    """The dotted key of a Hydra override (`+launcher.gpus=8` -> `launcher.gpus`)."""
    return override.lstrip("+~").split("=", 1)[0]


def check_launcher_keys(lc: LauncherConfig, overrides: Sequence[str]) -> None:
    """ValueError naming the first `launcher.<key>` of `overrides` that launcher `lc.name` never
    reads: a local key (`launcher.gpus`) on a SLURM launch, or a SLURM key on a local one."""
    foreign = LOCAL_KEYS if lc.name == "slurm" else SLURM_KEYS
    for key in map(override_key, overrides):
        if key.startswith("launcher.") and key.removeprefix("launcher.") in foreign:
            raise ValueError(f"{key}: {_foreign_key_reason(lc.name, overrides)}")


def _foreign_key_reason(name: str, overrides: Sequence[str]) -> str:
    """Why a key is ignored by launcher `name`, and what to do instead (one line)."""
    chosen = [o for o in overrides if override_key(o) in ("launcher", "launcher.name")]
    experiment = [o for o in overrides if override_key(o) == "experiment"]
    if chosen:
        why = chosen[-1].lstrip("+")
    elif name == "local":  # every app's default
        why = "launcher=local, the default"
    elif experiment:  # only experiments and configs/local/ select slurm without an override
        why = f"{experiment[-1].lstrip('+')} selects launcher=slurm"
    else:
        why = "launcher=slurm in the config files"
    if name == "slurm":
        return (
            f"a key of the local launcher, but this run is submitted to SLURM ({why}): size a "
            "SLURM job with launcher.nodes and launcher.gpus_per_node, or add launcher=local to "
            "run on this machine"
        )
    return (
        f"a key of the SLURM launcher, but this run runs on this machine ({why}): add "
        "launcher=slurm to submit it to SLURM, or set launcher.gpus for local processes"
    )


def hydra_overrides() -> list[str]:
    """This run's command-line overrides when a Hydra app is running, else []."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def under_process_launcher() -> bool:
    """True inside torchrun or a multi-task srun step (ranks already exist)."""
    from pixio.runtime.distributed import read_dist_env

    env = read_dist_env()
    return env.source == "torchrun" or env.world_size > 1


def validate_and_launch(
    main: Callable[[DictConfig], Any], cfg: DictConfig, validate: Callable[[DictConfig], Any]
) -> Any:
    """Every job's Hydra entry: refuse keys the schema does not have (`check_known_keys`: Hydra
    adds a `+key=value` even to a structured group), `validate(cfg)` (a ConfigError prints one
    `config error: <key>: ...` line and exits 2, before anything is built), then
    `launch(main, cfg)`; `launcher=slurm` without a SLURM client is one `error: ...` line, exit 1,
    before anything is submitted or created."""
    from pixio.runtime.config import ConfigError, check_known_keys  # config imports this module

    try:
        check_known_keys(cfg)
        validate(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        return launch(main, cfg)
    except SlurmUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def launch(
    main: Callable[[DictConfig], Any], cfg: DictConfig, overrides: Sequence[str] | None = None
) -> Any:
    """Run ``main(cfg)`` as ``cfg.launcher`` says.

    ``overrides``: the command-line overrides torchrun workers get; by default Hydra's (or
    ``sys.argv[1:]`` outside a Hydra app).
    """
    lc = launcher_config(cfg.get("launcher"))
    if lc.name == "slurm":
        return submit_slurm(main, cfg, lc)
    if lc.gpus > 1 and not under_process_launcher():
        return run_torchrun(cfg, lc.gpus, _overrides() if overrides is None else overrides)
    return main(cfg)


def _overrides() -> list[str]:
    """This run's command-line overrides (outside a Hydra app: sys.argv[1:])."""
    from hydra.core.hydra_config import HydraConfig

    return hydra_overrides() if HydraConfig.initialized() else sys.argv[1:]


# -- local: torchrun ---------------------------------------------------------------------------
def _main_module() -> str | None:
    """Name of the module run with ``python -m`` (None when a script path was run)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else None


def _hydra_value(value: str) -> str:
    """Quote a value for a Hydra override when it has characters Hydra's grammar treats specially."""
    if re.fullmatch(r"[\w./:@%+~-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def torchrun_command(
    nproc: int, overrides: Sequence[str], module: str | None = None, output_dir: str | None = None
) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m module overrides`` with this interpreter.

    ``output_dir`` pins the workers to the parent's resolved output directory (a default built
    from the time of day would differ between workers).
    """
    args = list(overrides)
    if output_dir is not None:
        args = [a for a in args if a.lstrip("+").split("=", 1)[0] != "output_dir"]
        args.append(f"output_dir={_hydra_value(output_dir)}")
    target = ["-m", module] if module else [sys.argv[0]]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc_per_node={nproc}", *target, *args]


# torchrun's agent passes these on to the ranks (SIGUSR2: SLURM's time-limit signal, which would
# otherwise end the agent at once) and waits this long for them to save before it kills them
# (its own default, 30 s, is shorter than a 5B save; see docs/slurm.md).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
TORCHRUN_SHUTDOWN_TIMEOUT_S = 300


def _torchrun_env() -> dict[str, str]:
    """This environment with the defaults above, where the user set none."""
    env = dict(os.environ)
    env.setdefault("PET_SIGNALS_TO_HANDLE", TORCHRUN_SIGNALS)
    if NUM_THREADS_ENV not in env:  # torchrun then sets 1 per rank: not the user's choice, so
        mark_default(NUM_THREADS_ENV, env)  # the ranks' train.cpu_threads=auto decides
    if "PET_SHUTDOWN_TIMEOUT" not in env:
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(TORCHRUN_SHUTDOWN_TIMEOUT_S))
    return env


def wait_through_signals(child: subprocess.Popen) -> int:
    """`pixio.runtime.preemption.wait_through_signals`, imported on use (it loads torch)."""
    from pixio.runtime import preemption

    return preemption.wait_through_signals(child)


def run_torchrun(cfg: DictConfig, nproc: int, overrides: Sequence[str]) -> None:
    """Re-run this entry point as ``nproc`` torchrun workers; exits with their status on failure
    (143 after a stop signal, which this process outlives until the ranks have saved)."""
    output_dir = cfg.get("output_dir")
    out = str(Path(output_dir).absolute()) if output_dir else None
    cmd = torchrun_command(nproc, overrides, _main_module(), out)
    print(f"[pixio] spawning {nproc} processes: {' '.join(cmd)}", flush=True)
    code = wait_through_signals(subprocess.Popen(cmd, env=_torchrun_env()))
    if code != 0:
        raise SystemExit(code)


# -- SLURM: submitit (the job itself: pixio.runtime.slurm_job.SubmititMain) -----------------
def slurm_parameters(lc: LauncherConfig) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` arguments for ``lc``."""
    params: dict[str, Any] = {
        "name": lc.job_name,
        "nodes": lc.nodes,
        "tasks_per_node": lc.gpus_per_node,
        "cpus_per_task": lc.cpus_per_task,
        "timeout_min": lc.timeout_min,
        "slurm_signal_delay_s": lc.signal_delay_s,
        # Requeueable: SLURM may requeue it on pre-emption or node failure, and it requeues itself.
        "slurm_additional_parameters": {"requeue": True},
    }
    if lc.use_gpu:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.mem_gb is not None:
        params["mem_gb"] = lc.mem_gb
    for key in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(lc, key):
            params[f"slurm_{key}"] = getattr(lc, key)
    return params


def _importable(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` by its module name when it lives in ``python -m``'s ``__main__`` (so the job can
    import it instead of unpickling a copy of the whole ``__main__`` module)."""
    module = _main_module()
    if getattr(main, "__module__", None) != "__main__" or module is None:
        return main
    return getattr(importlib.import_module(module), main.__name__, main)


def require_sbatch() -> None:
    """SlurmUnavailableError unless `sbatch` is on PATH (submitit would end in a traceback)."""
    if shutil.which("sbatch") is None:
        raise SlurmUnavailableError(
            "launcher=slurm, but sbatch is not on PATH: this machine cannot submit SLURM jobs "
            "(run from a SLURM login node, or add launcher=local to run here); nothing was submitted"
        )


def submit_slurm(main: Callable[[DictConfig], Any], cfg: DictConfig, lc: LauncherConfig) -> Any:
    """Submit ``main(cfg)`` to SLURM; prints the job id and log path and returns the job.
    SlurmUnavailableError, before anything is created, where there is no `sbatch`."""
    require_sbatch()
    import submitit

    from pixio.runtime.slurm_job import SubmititMain

    # Resolve now: interpolations such as ${hydra:...} cannot be resolved inside the job.
    job_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    output_dir = Path(job_cfg.get("output_dir") or ".").absolute()
    if "output_dir" in job_cfg:
        job_cfg.output_dir = str(output_dir)
    folder = lc.folder or str(output_dir / "slurm" / "%j")
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=lc.max_num_timeout
    )
    executor.update_parameters(**slurm_parameters(lc))
    job = executor.submit(SubmititMain(_importable(main), job_cfg))
    shape = f"{lc.nodes} node(s) x {lc.gpus_per_node} task(s)"
    print(f"[pixio] submitted SLURM job {job.job_id} ({shape})", flush=True)
    print(f"[pixio] log: {job.paths.stdout} (errors: {job.paths.stderr})", flush=True)
    return job
