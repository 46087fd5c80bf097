"""Shared fixtures. Tests use tiny configurations of each preset and the real Corridor images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = Path(os.environ.get("VPR_EDGE_CORRIDOR", REPO.parent / "shared" / "data" / "corridor"))


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass


@pytest.fixture(scope="session")
def corridor() -> Path:
    if not (CORRIDOR / "ground_truth.csv").exists():
        pytest.skip(f"Corridor dataset not found at {CORRIDOR} (set VPR_EDGE_CORRIDOR)")
    return CORRIDOR
