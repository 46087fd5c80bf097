"""Training checkpoints: everything an exact resume needs, written atomically, read with weights_only.

`step-0000100.pt` holds the student (trainable part), optimizer, scheduler, grad scaler, EMA, RNG
states (python / numpy / torch / CUDA), the step and data position, the config and the cache
fingerprint. Only tensors, numbers, strings and containers: `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ArtifactError
from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")

FORMAT = "vpr-edge-distill-checkpoint"
FORMAT_VERSION = 1
FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d{7})\.pt$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def path_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save(run_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    path = path_for(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as fh:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "step": step} | payload, fh)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, device="cpu") -> dict[str, Any]:
    try:
        ck = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged file
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ArtifactError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {first}); delete it to resume from the previous one"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a vpr-edge distillation checkpoint; remove it from {path.parent}")
    if ck.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has checkpoint format_version {ck.get('format_version')}, this vpr-edge reads {FORMAT_VERSION}"
        )
    return ck
