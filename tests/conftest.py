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


@pytest.fixture(scope="module")
def one_faiss_thread():
    """torch.set_num_threads(2) above also sizes faiss' OpenMP pool (torch loaded first, one
    libgomp): on a busy 2-core machine two spinning threads make faiss' k-means ~30x slower."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# --- FP16/INT8 tests: Corridor verify/calibration images and the toy ViT + VLAD graph ------------


@pytest.fixture(scope="module")
def data(corridor):
    from vpr_edge.engines.precision.calibration import calibration_images
    from vpr_edge.presets import Preprocess
    from vpr_edge.verifyset import from_folder

    pre = Preprocess(image_size=(112, 154))
    cal, _ = calibration_images(corridor, pre, limit=48)
    return from_folder(corridor, pre, limit=64, with_fit=False), cal


@pytest.fixture(scope="module")
def toy_path(data):
    import toy_vit as toy

    return toy.toy_onnx(fit_images=data[1])


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module of tiny-model tests (distillation): many small ops, where a second
    thread only adds synchronisation; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imgs(corridor):
    """Six Corridor database images (distillation tests)."""
    return sorted((corridor / "database").glob("*.jpg"))[:6]
