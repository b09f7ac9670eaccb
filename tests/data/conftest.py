"""Fixtures for the data tests (helpers live in test_data_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data_helpers import web_shards


@pytest.fixture
def shards3(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A web root with 3 shards of 4 images."""
    root = tmp_path / "web"
    return root, web_shards(root, 3, 4)
