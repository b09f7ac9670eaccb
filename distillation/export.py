"""Export every student of a distillation checkpoint as a released encoder, on demand.

    python -m distillation.export outputs/distill/checkpoint-last [--out DIR]

Writes `encoder-<name>.safetensors` per student (the encoder without `last_proj`), as the run
itself does at its end; loadable by `pixio.load_encoder`. Only the students' weights are read
from the checkpoint (never the optimiser state).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distillation.task import STUDENT_PREFIX, export_name
from pixio.checkpoint import encoder_state, is_dcp_checkpoint, read_state_dict, save_state_dict
from pixio.safe_load import dcp_key_paths, read_dcp_metadata


def student_modules(checkpoint: str | Path) -> list[str]:
    """Names of the student modules saved in a DCP training checkpoint (student_<name>)."""
    paths = dcp_key_paths(read_dcp_metadata(Path(checkpoint))).values()
    names = {str(p[1]) for p in paths if p[0] == "model" and len(p) > 2}
    return sorted(n for n in names if n.startswith(STUDENT_PREFIX))


def export_students(checkpoint: str | Path, out: str | Path) -> list[Path]:
    """Write each student's encoder of `checkpoint` into `out`; returns the paths."""
    if not is_dcp_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a training checkpoint directory (no .metadata)")
    names = student_modules(checkpoint)
    if not names:
        raise ValueError(f"{checkpoint} holds no student module ({STUDENT_PREFIX}<name>)")
    return [
        save_state_dict(
            encoder_state(read_state_dict(checkpoint, module=name)), Path(out) / export_name(name)
        )
        for name in names
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory, e.g. .../checkpoint-last")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the run's)")
    args = p.parse_args(argv)
    out = args.out if args.out is not None else args.checkpoint.resolve().parent
    for path in export_students(args.checkpoint, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
