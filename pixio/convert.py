r"""Convert encoder checkpoints between formats, or export the whole pre-training model.

    python -m pixio.convert --model pixio_vith16 --input ckpt.pth --output encoder.safetensors
    python -m pixio.convert --input run/checkpoint-last --output enc.pth
    python -m pixio.convert --input encoder.safetensors --output hf_folder/
    python -m pixio.convert --input distill/checkpoint-last \
        --module student_pixio_vith16 --output vith16.safetensors
    python -m pixio.convert --full --input run/checkpoint-last --output mae.safetensors

`--model` (and `--override`) are needed only for an input that does not record its architecture
(a reference `.pth`, a Hugging Face folder): every `.safetensors` file Pixio writes records it
in its metadata, and a training checkpoint directory in its saved run config. Given anyway, they
must agree with it (one line naming the differing sizes otherwise). A `.safetensors` output
records the architecture too. `--full` writes the whole pre-training model (encoder + decoder,
reference key names) with its decoder sizes: what `pixio.hub.load_mae`, `pixio.visualize
reconstruct` and pre-training's `train.init_from` read.

The input may be any format `pixio.load_encoder` reads, including a training checkpoint directory
(only the tensors of one trained module are read: `--module`, by default the only one). The
output format follows the extension: `.safetensors`, `.pth`, or (no extension) a Hugging Face
`transformers` Pixio folder. The output may not be the input itself nor lie inside an input
directory (symlinks resolved): that would overwrite or corrupt the checkpoint being read. A
training checkpoint directory is verified against its manifest (sizes and sha256 of `.metadata`
and of the data files holding the module) before anything is written. A refused input or output
(several modules and no `--module`, a damaged or unsafe file, keys that do not match the
model, ...) is reported in one line, `error: ...`, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pixio.checkpoint import load_encoder, read_architecture, save_encoder, save_mae
from pixio.hf import export_hf
from pixio.hub import load_mae
from pixio.models.registry import list_models


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, int/float/bool/str value)."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def check_paths(src: str | Path, dst: str | Path) -> None:
    """Refuse an output that is the input, or lies inside an input directory (ValueError)."""
    src_r, dst_r = Path(src).resolve(), Path(dst).resolve()
    if src_r == dst_r:
        raise ValueError(f"--output {dst} is the input {src}: write the encoder elsewhere")
    if src_r.is_dir() and dst_r.is_relative_to(src_r):
        raise ValueError(
            f"--output {dst} lies inside the input checkpoint directory {src}: write it elsewhere"
        )


def convert(
    model: str | None,
    src: str | Path,
    dst: str | Path,
    module: str | None = None,
    full: bool = False,
    **overrides: Any,
) -> Path:
    """Load `src` (trained module `module` of a training checkpoint; None: the only one) into
    encoder `model` (None: the architecture `src` records), or with `full` into the whole
    pre-training model, and write it to `dst` (format from the extension)."""
    check_paths(src, dst)
    dst = Path(dst)
    if dst.suffix and dst.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(
            f"unknown output format {dst.suffix!r}: use .safetensors, .pth or a folder"
        )
    name = model or (read_architecture(src, module, run_config=True) or {}).get("name")
    if full:
        if not dst.suffix:
            raise ValueError("--full writes one .safetensors or .pth file, not a folder")
        return save_mae(load_mae(model, src, module, **overrides), dst, name)
    encoder = load_encoder(model, src, module, **overrides)
    return save_encoder(encoder, dst, name) if dst.suffix else export_hf(encoder, dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", choices=list_models(),
        help="registry name; needed only when the input does not record its architecture",
    )  # fmt: skip
    parser.add_argument(
        "--input", required=True, help="checkpoint file, training checkpoint dir or HF folder"
    )
    parser.add_argument("--output", required=True, help=".safetensors, .pth, or a folder (HF)")
    parser.add_argument(
        "--module",
        help="which trained module of a training checkpoint directory, e.g. student_pixio_vith16 "
        "(default: the only one)",
    )
    parser.add_argument(
        "--full", action="store_true",
        help="write the whole pre-training model (encoder + decoder) to one file",
    )  # fmt: skip
    parser.add_argument(
        "--override", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
        help="build_encoder override, e.g. --override img_size=512 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:  # convert checks the paths before reading anything
        out = convert(
            args.model, args.input, args.output, args.module, args.full, **dict(args.override)
        )
    except (ValueError, KeyError, OSError) as err:  # bad input or output: one line, no traceback
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
