"""torch.hub entry points of Pixio (local weights only; nothing is downloaded).

    import torch
    encoder = torch.hub.load("path/to/pixio", "pixio_vith16", source="local", weights="enc.pth")
    mae = torch.hub.load("path/to/pixio", "pixio_mae_vith16", source="local", weights="ckpt-dir")

The entries: `pixio_<size>` (the encoder, as
`pixio.load_encoder` / `pixio.build_encoder` return it) and `pixio_mae_<size>` (encoder +
decoder, as `pixio.build_mae`) for every registry size. See pixio/hub.py.
"""

from pixio import hub as _hub

dependencies = ["torch", "timm", "safetensors", "numpy"]

globals().update(_hub.hub_entries())
