"""Shared fixtures: tiny models and Hydra configs shrunk for CPU."""

from __future__ import annotations

import pytest
import torch
from tests_helpers import TINY, TINY_DECODER

import pixio


@pytest.fixture
def tiny_encoder() -> pixio.PixioEncoder:
    torch.manual_seed(0)
    return pixio.build_encoder("pixio_vitt16", **TINY).eval()


@pytest.fixture
def tiny_mae() -> pixio.PixioMAE:
    torch.manual_seed(0)
    return pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)
