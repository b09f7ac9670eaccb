"""Export every student of a distillation checkpoint as a released encoder, on demand.

    python -m distillation.export outputs/distill/checkpoint-last [--out DIR]

Writes `encoder-<name>-step<N>.safetensors` per student (the encoder without `last_proj`), N
being the checkpoint's step, into the run's folder (or DIR); loadable by `pixio.load_encoder`.
The plain `encoder-<name>.safetensors` is the run's own end-of-training export and is never
written here, so exporting an older checkpoint cannot replace it. A file already at the target
name is left as it is when it holds the same bytes and refused otherwise (nothing is written
then). The checkpoint is verified against its manifest (`.metadata` and the data files holding
the students) before anything is written; only the students' weights are read, never the
optimiser state. Errors: one line, `error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
from pathlib import Path

from distillation.task import STUDENT_PREFIX, export_name
from pixio.checkpoint import (
    encoder_state,
    is_dcp_checkpoint,
    read_architecture,
    read_module_states,
    save_state_dict,
    trained_modules,
)
from pixio.runtime.checkpoint_dir import read_manifest


def step_export_name(module: str, step: int) -> str:
    """The exported file of student `module` at checkpoint step `step`:
    encoder-<encoder name>-step<step>.safetensors."""
    return export_name(module).removesuffix(".safetensors") + f"-step{step}.safetensors"


def student_modules(checkpoint: str | Path) -> list[str]:
    """Names of the student modules saved in a DCP training checkpoint (student_<name>)."""
    return [n for n in trained_modules(checkpoint) if n.startswith(STUDENT_PREFIX)]


def _checkpoint_step(checkpoint: Path) -> int:
    step = read_manifest(checkpoint).get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"{checkpoint}: its manifest.json records no step")
    return step


def _commit(staged: dict[Path, Path]) -> list[Path]:
    """Move each staged file (temporary -> target) into place, unless some target already holds
    other bytes: then every staged file is removed and ValueError names the first such target."""
    clash = [t for tmp, t in staged.items() if t.exists() and not filecmp.cmp(tmp, t, False)]
    for tmp, target in staged.items():
        if clash or target.exists():  # an identical file stays as it is
            tmp.unlink()
        else:
            os.replace(tmp, target)
    if clash:
        raise ValueError(
            f"{clash[0]} exists and holds other weights (a checkpoint saved again at that step?): "
            "move it away or pass --out; nothing was written"
        )
    return list(staged.values())


def export_students(checkpoint: str | Path, out: str | Path) -> list[Path]:
    """Write each student's encoder of `checkpoint` into `out` as
    encoder-<name>-step<N>.safetensors; returns the paths. All or nothing: a damaged checkpoint
    or a different file at a target name leaves `out` as it was."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not is_dcp_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a training checkpoint directory (no .metadata)")
    names = student_modules(checkpoint)
    if not names:
        raise ValueError(f"{checkpoint} holds no student module ({STUDENT_PREFIX}<name>)")
    step = _checkpoint_step(checkpoint)
    staged: dict[Path, Path] = {}
    try:
        for name, state in read_module_states(checkpoint, names):
            target = out / step_export_name(name, step)
            tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.safetensors")
            # The run's saved config gives each student's sizes: the file records them.
            architecture = read_architecture(checkpoint, name)
            staged[save_state_dict(encoder_state(state), tmp, architecture)] = target
    except BaseException:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise
    return _commit(staged)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Files: encoder-<name>-step<N>.safetensors per student (N: the checkpoint's "
        "step); the run's own encoder-<name>.safetensors is never replaced, and a different "
        "file already at a target name is refused (nothing written).",
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory, e.g. .../checkpoint-last")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the run's)")
    args = p.parse_args(argv)
    out = args.out if args.out is not None else args.checkpoint.resolve().parent
    try:
        paths = export_students(args.checkpoint, out)
    except (ValueError, OSError) as err:  # damaged checkpoint, name clash, ...: one line
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
