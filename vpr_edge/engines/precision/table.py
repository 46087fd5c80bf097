"""The precisions, one record each: what the CLI offers, how a graph is lowered to it, how the result is
verified, which export options apply, and the gate's thresholds. The CLI choices, the export gates,
doctor and the runtime's manifest checks all read this table; adding BF16 or FP8 is one record (and
its `Lowering` class).

Pure Python at import (the lean runtime reads it on a robot without onnx): a record's lowering class
is imported when `lowering()` is called.

The gate: a report from `vpr_edge.fidelity.compare_descriptors` (or `compare_outputs`) passes when
every threshold of the precision holds and the outputs are not degenerate (`degenerate_outputs`:
non-finite, zero-norm or constant descriptors fail whatever the error metrics say: an all-zero PCA
gives cosine 0 everywhere but an error of 0 against an all-zero reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vpr_edge.errors import ConfigError
from vpr_edge.fidelity import TIE_EPS


@dataclass(frozen=True)
class Threshold:
    metric: str  # key of the fidelity report
    bound: float
    upper: bool = False  # True: metric <= bound; False: metric >= bound
    label: str = ""  # how a failure reads

    def failure(self, report: dict[str, Any]) -> str | None:
        value = report.get(self.metric)
        if value is None:
            return f"{self.metric} missing from the report"
        ok = value <= self.bound if self.upper else value >= self.bound  # NaN fails both
        if ok:
            return None
        return self.label.format(value=value, bound=self.bound, **report) if self.label else (
            f"{self.metric} {value:.5g} {'>' if self.upper else '<'} {self.bound}"
        )


@dataclass(frozen=True)
class Precision:
    name: str
    summary: str
    thresholds: tuple[Threshold, ...]
    lowering: Callable[[], type] | None = None  # None: the exported FP32 graph itself
    io_dtypes: tuple[str, ...] = ("float32",)  # graph input/output types the artifact may declare
    options: frozenset[str] = field(default_factory=frozenset)  # export options that apply to it
    keeps: str = ""  # which nodes stay in higher precision (for --help and manifests)

    def gate(self, report: dict[str, Any]) -> list[str]:
        """Failed thresholds as readable lines (empty: passed)."""
        fails = [f for t in self.thresholds if (f := t.failure(report))]
        return fails + degenerate_outputs(report)

    def threshold_record(self) -> dict[str, Any]:
        """For manifests: metric -> bound (with <= for upper bounds)."""
        return {t.metric: (f"<= {t.bound}" if t.upper else t.bound) for t in self.thresholds}


def degenerate_outputs(report: dict[str, Any]) -> list[str]:
    """Refusals that no error metric may override (reports carry these counts from compare_descriptors;
    non-finite values are a threshold of every precision)."""
    out = []
    if report.get("zero_norm", 0):
        out.append(f"{report['zero_norm']} of {report.get('n_images', '?')} descriptors have zero norm")
    if report.get("constant_rows", 0):
        out.append(f"{report['constant_rows']} descriptors are constant across their dimensions")
    if report.get("n_images", 0) > 1 and report.get("distinct_rows", 2) < 2:
        out.append("every image got the same descriptor")
    return out


def _fp16():
    from vpr_edge.engines.precision.fp16 import Fp16Lowering

    return Fp16Lowering


def _int8():
    from vpr_edge.engines.precision.int8 import Int8Lowering

    return Int8Lowering


_NONFINITE = Threshold("nonfinite", 0, upper=True, label="{value} NaN/Inf values in the outputs")
_LOWERED = frozenset({"target_agreement"})

PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(
            name="fp32",
            summary="the exported graph as it is (FP32 ONNX); judged against PyTorch FP32",
            thresholds=(
                # rel_err with hard-VLAD assignment ties allowed (export.ties); the strict rel_err is reported too
                Threshold("rel_err_ties", 1e-4, upper=True, label="rel_err {value:.2e} > {bound:.0e} (tokens whose two "
                          f"nearest centres the reference scores within {TIE_EPS:.0e} may take either; strict "
                          "{rel_err:.2e})"),
                Threshold(
                    "top5_agreement_ties", 1.0,
                    label="top-5 agreement {value:.3f} < 1.0 (swaps of images the reference scores within "
                    f"{TIE_EPS:.0e} counted as ties; score error {{score_err_max:.1e}})",
                ),
                Threshold("nonfinite", 0, upper=True, label="{value} non-finite outputs"),
            ),
        ),
        Precision(
            name="fp16",
            summary="FP16 in the graph with FP32 islands (onnxconverter-common), verified in ORT and emulated",
            thresholds=(
                _NONFINITE,
                Threshold("cos_mean", 0.999, label="mean descriptor cosine {value:.5f} < {bound}"),
                Threshold("top1_agreement", 0.99, label="top-1 agreement {value:.3f} < {bound}"),
            ),
            lowering=_fp16,
            io_dtypes=("float32", "float16"),
            options=_LOWERED | {"io_dtype"},
            keeps="LayerNorm, Softmax and the QK^T feeding it, norms, the VLAD assignment and the descriptor head; "
            "nodes the overflow scan flags",
        ),
        Precision(
            name="int8",
            summary="explicit Q/DQ INT8 (symmetric per-channel weights, per-tensor activations) on MatMul/Gemm/Conv",
            thresholds=(
                _NONFINITE,
                Threshold("cos_mean", 0.98, label="mean descriptor cosine {value:.5f} < {bound}"),
                Threshold("top1_agreement", 0.95, label="top-1 agreement {value:.3f} < {bound}"),
            ),
            lowering=_int8,
            options=_LOWERED | {"calibration", "calibration_method", "calibration_limit", "int8_outliers", "smooth_alpha"},
            keeps="everything but MatMul/Gemm/Conv inputs; attention MatMuls, the layer reading the image and the "
            "descriptor head stay float; outlier input channels found in calibration go through a thin float MatMul",
        ),
    )
}


def names() -> tuple[str, ...]:
    return tuple(PRECISIONS)


def get(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def lowered() -> tuple[str, ...]:
    """Precisions made by lowering the FP32 graph (the ones with a Lowering class)."""
    return tuple(n for n, p in PRECISIONS.items() if p.lowering is not None)
