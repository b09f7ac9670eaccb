"""What the baseline adapters share: their base class (input re-normalisation, the description
results.json records) and their error type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.features import FeatureEncoder


class BaselineError(ValueError):
    """A baseline that cannot be built or loaded; `key` names the `encoder` field at fault
    (`name`, `checkpoint` or `model_kwargs`), so a config error can name it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class BaselineEncoder(FeatureEncoder):
    """A third-party ViT (`self.model`) behind the feature API.

    Subclasses set `patch_size`, `embed_dim`, `n_cls_tokens`, `n_register_tokens`, give `blocks`
    and `norm` as properties over `model` (never as attributes: the state dict keeps the model's
    own key names), `source`, `embed_tokens` and `read_state`."""

    def __init__(
        self, model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def renormalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> normalised with the model's own statistics (identity
        when they are the ImageNet ones). The zero padding of sliding windows stays the ImageNet
        mean colour, as for Pixio."""
        if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            return x
        src_mean, src_std = _column(IMAGENET_MEAN, x), _column(IMAGENET_STD, x)
        mean, std = _column(self.mean, x), _column(self.std, x)
        return (x * src_std + src_mean - mean) / std

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(self.renormalize(x))

    def describe(self) -> dict[str, Any]:
        """The FeatureEncoder record, plus the wrapped class and the input statistics."""
        model = type(self.model).__name__
        return {
            **super().describe(),
            "mean": list(self.mean),
            "std": list(self.std),
            "model": model,
        }

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model's normalisation -> (B, n_cls + n_reg + h*w, D)."""
        raise NotImplementedError

    def read_state(self, checkpoint: str) -> dict[str, torch.Tensor]:
        """The full state dict of `self.model` read from `checkpoint` (rank 0 calls it; the others
        receive a broadcast). The caller checks it strictly against the model
        (`pixio.checkpoint.broadcast_checked_state`); BaselineError for a file the reader
        refuses."""
        raise NotImplementedError


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
