"""FP16/INT8 step of the export: lower the verified FP32 graph, verify against PyTorch FP32."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def lower_precision(preset, aggregator, fp32_path: Path, vs, ref_desc: np.ndarray, options, dst: Path) -> dict[str, Any]:
    """Write the FP16/INT8 graph of `fp32_path` to `dst`; return manifest details with a
    'verification' entry (judged against the PyTorch FP32 descriptors `ref_desc`)."""
    from vpr_edge.engines import calibration as C
    from vpr_edge.engines.lower import VerifyData, lower_onnx
    from vpr_edge.export.torch_side import descriptors_from_features

    calib = None
    calib_source = ""
    calib_info: dict[str, Any] = {}
    if options.calibration is not None:
        calib, calib_info = C.calibration_images(
            options.calibration, preset.preprocess, limit=options.calibration_limit, progress=options.progress
        )
        calib_source = str(options.calibration)
    def to_desc(features: np.ndarray) -> np.ndarray:
        return descriptors_from_features(aggregator, features)

    res = lower_onnx(
        fp32_path,
        dst,
        options.precision,
        VerifyData(vs.images, vs.db_idx, vs.q_idx, vs.positives, vs.source),
        reference=ref_desc,
        to_descriptors=to_desc if options.scope == "backbone" else None,
        calibration=calib,
        calibration_method=options.calibration_method,
        calibration_source=calib_source,
        io_dtype=options.io_dtype,
        target_agreement=options.target_agreement,
        accept_fidelity=options.accept_fidelity,
    )
    details = dict(res.details)
    if calib_info:
        details["calibration_set"] = calib_info
    details["verification"] = {**res.verification, "reference": "PyTorch FP32 eager"}
    return details


def remove_graph(path: Path) -> None:
    """Delete an ONNX file and its external-data files."""
    from vpr_edge.export.onnx_from_torch import onnx_files

    for name in onnx_files(path):
        os.unlink(path.parent / name)
