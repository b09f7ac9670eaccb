"""A run's own config record, and the check a resume makes against the checkpoint's config.

`output_dir/config.yaml` is written once, by the run that starts the directory, and never
overwritten. A resume compares its config with the one stored in the checkpoint it will load,
before anything is built: keys that change the model's shape are refused with one line (the
weights could not be loaded), and so is another file where the config records a file's digest
(`files`: a frozen encoder's `encoder.sha256` beside `encoder.checkpoint`; a moved file with the
same digest passes); every other changed key is logged (as a warning when it changes what the run
computes, so the resume is no longer the run it continues; as information for bookkeeping keys
such as the launcher), and the new config is kept beside the original as
`config.resume-<iteration>.yaml`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pixio.runtime.config import ConfigError

log = logging.getLogger("pixio.config")

CONFIG_NAME = "config.yaml"
# Keys whose change affects nothing a run computes (where it runs, how often it reports).
BOOKKEEPING_PREFIXES = (
    "launcher.", "logger.", "output_dir", "train.max_iters", "train.log_every",
    "train.vis_every", "train.save_every_iters", "train.keep_last", "train.keep_every",
    "train.async_save", "train.compile", "train.device", "data.num_workers", "data.root",
    "data.shard_list", "paths.", "train.cpu_threads", "train.peak_tflops",
)  # fmt: skip


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs (missing keys as None)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_frozen(key: str, frozen: tuple[str, ...]) -> bool:
    """`key` is a frozen key or lies inside one (`encoder.model_kwargs.depth` in
    `encoder.model_kwargs`: dicts are compared leaf by leaf)."""
    return any(key == f or key.startswith(f"{f}.") for f in frozen)


def check_resume_config(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    frozen: Iterable[str],
    source: str,
    introduced: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
) -> list[tuple[str, Any, Any]]:
    """ConfigError on the first changed `frozen` key (those that fix parameter shapes) or
    changed file digest; log the other changes. Returns all changes. `introduced`: keys added to
    the schema later, with the value that an older run's config (which lacks them) stands for.
    `files`: digest key -> the path key of the file it identifies (`{"encoder.sha256":
    "encoder.checkpoint"}`); None as a digest stands for random weights (no file)."""
    introduced, files = introduced or {}, dict(files or {})
    flat_old, flat_new = flatten(old), flatten(new)
    unrecorded = {key for key in files if key not in flat_old}  # saved before digests were kept
    changes = [
        (k, was, now) for k, was, now in config_changes(old, new)
        if not (was is None and k in introduced and now == introduced[k])
    ]  # fmt: skip
    _check_files(flat_old, flat_new, files, unrecorded, source)
    frozen = tuple(frozen)
    for key, was, now in changes:
        if is_frozen(key, frozen):
            raise ConfigError(
                f"{key}: {source} was trained with {was!r}; this run asks for {now!r}. A resume "
                f"cannot change the model's shape: set it back, or use a new output_dir"
            )
    # A moved file (same digest) and a digest an older run did not record change nothing computed.
    same_file = {files[k] for k in files if k not in unrecorded} | unrecorded
    for key, was, now in changes:
        quiet = key.startswith(BOOKKEEPING_PREFIXES) or key in same_file
        level = logging.INFO if quiet else logging.WARNING
        log.log(level, "resume changes %s: %r -> %r (checkpoint: %s)", key, was, now, source)
    if any(not (key.startswith(BOOKKEEPING_PREFIXES) or key in same_file) for key, _, _ in changes):
        log.warning(
            "the resumed run differs from the saved one: it will not equal an uninterrupted run"
        )
    return changes


def _check_files(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    files: Mapping[str, str],
    unrecorded: set[str],
    source: str,
) -> None:
    """ConfigError naming the path key when a recorded file digest differs from this run's."""
    for key, path_key in files.items():
        if key in unrecorded:
            log.warning(
                "%s does not record %s (saved before file digests were kept): cannot check that "
                "%s is the file it was trained with", source, key, path_key,
            )  # fmt: skip
        elif old[key] != new.get(key):
            raise ConfigError(
                f"{path_key}: {source} was trained with {_file(old.get(path_key), old[key])}; "
                f"this run has {_file(new.get(path_key), new.get(key))}. A resume cannot change "
                f"the weights the run was built on: set it back, or use a new output_dir"
            )


def _file(path: Any, digest: str | None) -> str:
    return "random weights (no file)" if digest is None else f"{path} (sha256 {digest[:16]})"


def write_run_config(
    output_dir: str | os.PathLike, config: Mapping[str, Any], iteration: int
) -> Path | None:
    """`config.yaml` for a new run; for a resume whose config changed,
    `config.resume-<iteration>.yaml` beside it. None when nothing needed writing."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    if path.exists():
        original = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not config_changes(original, config):  # type: ignore[arg-type]
            return None
        path = out / f"config.resume-{iteration:08d}.yaml"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(config))), encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_resume(
    output_dir: str | os.PathLike,
    config: Mapping[str, Any],
    frozen: Iterable[str],
    introduced: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
) -> None:
    """Before building anything: compare `config` with the newest checkpoint's (ConfigError on a
    shape change or another file; other changes logged; see `check_resume_config`). Writes
    nothing: the trainer records the config once the run has started or resumed
    (`write_run_config`)."""
    found = _newest_meta(output_dir)
    if found is not None:
        path, meta = found
        old = meta.get("config") or {}
        check_resume_config(old, config, frozen, str(path), introduced, files)


def _newest_meta(output_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """(path, meta) of the newest checkpoint whose meta reads; None without checkpoints."""
    from pixio.runtime.checkpointing import CheckpointError, numbered_checkpoints, read_meta

    for _, path in reversed(numbered_checkpoints(output_dir)):
        try:
            return path, read_meta(path)
        except CheckpointError as err:  # the loader will fall back past it and say so
            log.warning("config check skips %s: %s", path, err)
    return None
