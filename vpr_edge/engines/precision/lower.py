"""FP32 ONNX -> verified lower-precision ONNX: the one flow behind `vpr-export --precision fp16|int8`.

`lower_onnx` reads the precision's record (`table.PRECISIONS`) and drives its `Lowering` class
(`fp16.Fp16Lowering`, `int8.Int8Lowering`): prepare (overflow scan / calibration), build graphs that
keep a set of nodes in higher precision, optionally search for the fewest transformer blocks (then
nodes) to keep so a top-1 target is met (`fallback.fallback_search`), build the final graph, verify
it, apply the record's gate. The FP32 reference is given by the caller (export passes PyTorch's
descriptors) or is the FP32 ONNX run by ONNX Runtime on the same images, so the report isolates what
precision costs.

The final artifact is verified by `run_final(path)` when the caller gives one (export runs the
artifact through the lean runtime's Describer, the path users run on the robot), else by ONNX
Runtime here. A precision whose record says its arithmetic is not computed faithfully on this CPU
(FP16: ORT computes FP16 chains in FP32) is also verified through its emulation graph
(`emulate.py`); the gate takes the worse of the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.engines.precision import table
from vpr_edge.errors import ConfigError, FidelityError
from vpr_edge.fidelity import compare_outputs
from vpr_edge.measure import PeakRss, cpu_features
from vpr_edge.onnxrt import run_onnx, session_config
from vpr_edge.verifyset import VerifySet

log = logging.getLogger(__name__)

OUTSIDE_BLOCKS = -1  # fallback unit for nodes outside the transformer blocks


@dataclass
class LowerResult:
    precision: str
    onnx: Path
    details: dict[str, Any]  # for manifest.details (precision report, islands, fallback, cost)
    verification: dict[str, Any]  # for manifest.verification[precision]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.verification.get("passed"))


def _worst(reports: Iterable[dict[str, Any]]) -> dict[str, Any]:
    reports = list(reports)
    worst = dict(reports[0])
    for r in reports[1:]:
        for key in ("cos_min", "cos_mean", "top1_agreement", "top5_agreement", "top5_overlap"):
            if key in r:
                worst[key] = min(worst.get(key, r[key]), r[key])
        for key in ("nonfinite", "rel_err", "max_abs_err", "zero_norm", "constant_rows"):
            if key in r:
                worst[key] = max(worst.get(key, r[key]), r[key])
    return worst


def search_context(fp32_onnx: Path, arrays: Iterable[np.ndarray | None], settings: dict[str, Any]) -> str:
    """Digest of everything a fallback score depends on: the FP32 graph and its weights (file bytes:
    ~10 s for ViT-G's 4.5 GB, against minutes per score), the verify images and reference, the calibration
    images, the lowering's settings and this package's version. A journal line of another digest is
    never read back (`fallback.SearchJournal`)."""
    import vpr_edge
    from vpr_edge.integrity import sha256_file

    h = hashlib.sha256()
    for f in [fp32_onnx, *G.external_data_files(fp32_onnx)]:
        h.update(sha256_file(f).encode())
    for a in arrays:
        h.update(b"none" if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode())
    h.update(json.dumps({**settings, "version": vpr_edge.__version__}, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:24]


def lower_onnx(
    fp32_onnx: str | Path,
    dst_onnx: str | Path,
    precision: str,
    verify: VerifySet,
    *,
    reference: np.ndarray | None = None,
    to_descriptors: Callable[[np.ndarray], np.ndarray] | None = None,
    run_final: Callable[[Path], np.ndarray] | None = None,
    calibration: np.ndarray | None = None,
    calibration_method: str = "max",
    calibration_source: str = "",
    io_dtype: str | tuple[str, str] = "float32",
    target_agreement: float | None = None,
    refine_nodes: bool = False,
    overflow_guard: bool = True,
    accept_fidelity: bool = False,
    max_evals: int = 48,
    outliers: Any = None,
    prepared: Any = None,
    journal: str | Path | None = None,
) -> LowerResult:
    """Write the `precision` graph of `fp32_onnx` to `dst_onnx` and verify it.

    reference: FP32 outputs on verify.images (default: ORT on `fp32_onnx`). to_descriptors maps raw
    outputs (e.g. backbone features) to descriptors before comparison. run_final(path) -> descriptors of
    verify.images through the path users run (default: ORT + to_descriptors). calibration: INT8
    calibration images [n, 3, H, W] (default: the verify images, with a warning). outliers: INT8's
    `smoothing.OutlierOptions` (default: the lowering's own). prepared: what the lowering's prepare step
    would compute, already computed by the caller (FP16: `fp16.scan_with_outputs`). journal: a file where
    the fallback search logs each score and resumes from (`fallback.SearchJournal`). Raises FidelityError
    outside the record's gate unless accept_fidelity, which is then recorded."""
    from vpr_edge.engines.precision.emulate import save_fp16_emulation
    from vpr_edge.engines.precision.fallback import SearchJournal, fallback_search

    record = table.get(precision)
    if record.lowering is None:
        raise ConfigError(f"precision {precision!r} is the exported graph itself; lower to one of {', '.join(table.lowered())}")
    if target_agreement is not None and not 0.0 < target_agreement <= 1.0:
        raise ConfigError(f"--target-agreement must be in (0, 1], got {target_agreement}")
    fp32_onnx, dst_onnx = Path(fp32_onnx), Path(dst_onnx)
    post = to_descriptors or (lambda x: x)
    reference_label = "FP32 outputs given by the caller" if reference is not None else "FP32 ONNX in ONNX Runtime (CPU)"
    if reference is None:
        reference = post(run_onnx(fp32_onnx, verify.images))
    model = G.load(fp32_onnx, load_weights=False)
    G.GraphIndex.of(model)
    flops = G.node_flops(model)
    blocks = G.nodes_by_block(model)
    work = Path(tempfile.mkdtemp(prefix=".lower-", dir=dst_onnx.parent if dst_onnx.parent.exists() else None))
    lowering = record.lowering()(
        fp32_onnx, verify, io_dtype=io_dtype, overflow_guard=overflow_guard, calibration=calibration,
        calibration_method=calibration_method, calibration_source=calibration_source, work=work,
        **({"outliers": outliers} if outliers is not None else {}),
        **({"prepared": prepared} if prepared is not None else {}),
    )
    details: dict[str, Any] = {"precision": precision}
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}

    @contextmanager
    def timed(step: str):
        """Seconds and peak RSS per sub-step, in details["lowering_timings_s"] and ["lowering_peak_rss_gib"] (where the
        lowering's time and memory go on a big model)."""
        t0 = time.perf_counter()
        with PeakRss() as rss:
            try:
                yield
            finally:
                timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - t0, 3)
        peaks[step] = round(max(peaks.get(step, 0.0), rss.peak_bytes / 2**30), 2)

    def compare(outputs: np.ndarray) -> dict[str, Any]:
        return compare_outputs(reference, outputs, verify.db_idx, verify.q_idx, verify.positives)

    def emulation(path: Path) -> dict[str, Any]:
        run_path = work / f"{path.stem}.emulated.onnx"
        with timed("emulation graph"):
            save_fp16_emulation(path, run_path)
        with timed("emulation run"):
            return compare(post(run_onnx(run_path, verify.images)))

    try:
        with timed(lowering.prepare_step):
            lowering.prepare(G.fixed_batch(fp32_onnx))

        def build(keep: frozenset[str]) -> Path:
            tag = hashlib.sha1("\n".join(sorted(keep)).encode()).hexdigest()[:10]
            path = work / f"{precision}-{tag}.onnx"
            if not path.exists():
                lowering.build(keep, path)
            return path

        ops = {n.name: n.op_type for n in model.graph.node}
        node_filter = None if lowering.candidate_ops is None else (lambda name: ops.get(name) in lowering.candidate_ops)

        def agreement(path: Path) -> float:
            """What the gate will judge: the worse of the graph in ORT and its emulation. A choice that
            misses the gate's mean-cosine threshold scores 0, so the search returns an artifact that passes
            the gate, not only the top-1 target (measured on ViT-S INT8: plain INT8 met top-1 0.95 on the
            verify split with cos mean 0.973 < 0.98)."""
            reps = [compare(post(run_onnx(path, verify.images)))] + ([emulation(path)] if lowering.emulated else [])
            if any(r["nonfinite"] for r in reps) or any(record.gate(dict(r, top1_agreement=1.0)) for r in reps):
                return 0.0
            return min(r["top1_agreement"] for r in reps)

        keep: frozenset[str] = frozenset()
        if target_agreement is not None:
            # unit -1: everything outside the transformer blocks (patch embedding, a facet block the
            # exporter inlined, head), so the search can also reach targets that blocks alone cannot
            units: dict[int, list[str]] = dict(blocks)
            in_blocks = {n for ns in blocks.values() for n in ns}
            rest = [n.name for n in model.graph.node if n.name not in in_blocks and (node_filter is None or node_filter(n.name))]
            if rest:
                units[OUTSIDE_BLOCKS] = rest
            if not blocks:
                lowering.warnings.append("no transformer blocks found in the graph: the fallback search can only keep the whole graph")
            book = None
            if journal is not None:
                settings = {"precision": precision, "calibration_method": calibration_method, "io_dtype": io_dtype,
                            "target": target_agreement, "overflow_guard": overflow_guard, "outliers": outliers,
                            "verify": [np.asarray(verify.db_idx).tolist(), np.asarray(verify.q_idx).tolist(),
                                       [np.asarray(p).tolist() for p in verify.positives or []]]}
                arrays = [verify.images, reference, calibration]
                with timed("search journal digest"):
                    book = SearchJournal(journal, search_context(fp32_onnx, arrays, settings))
                log.info("fallback search: each score goes to %s as it is known; a rerun on the same inputs resumes from it",
                         journal)
            fb = fallback_search(build, agreement, units, target_agreement, refine_nodes=refine_nodes,
                                 node_filter=node_filter, flops=flops, max_evals=max_evals, journal=book)
            keep = frozenset(fb.nodes)
            details["fallback"] = fb.to_dict()
            if not fb.met:
                lowering.warnings.append(f"fallback: target top-1 agreement {target_agreement} not reached (best {fb.agreement:.3f})")

        with timed("graph conversion"):
            lowering.build(keep, dst_onnx)
        details.update(lowering.final_details(model))
        total = sum(flops.values()) or 1.0
        split = getattr(lowering, "split_share", {})  # INT8: the share of a MatMul's FLOPs split off to float

        def float_share(whole: Iterable[str]) -> float:
            whole = set(whole)
            return (sum(flops.get(n, 0.0) for n in whole)
                    + sum(flops.get(n, 0.0) * s for n, s in split.items() if n not in whole)) / total

        details["high_precision_flops_fraction"] = float_share(lowering.kept)
        # what the fallback and the outlier split keep beyond the precision's fixed exclusions (attention, head,
        # first layer): the cost of making this graph pass
        details["beyond_default_flops_fraction"] = float_share(keep)

        with timed("verification run"):
            final = run_final(dst_onnx) if run_final is not None else post(run_onnx(dst_onnx, verify.images))
        reports = {"onnxruntime": compare(final)}
        if lowering.emulated:
            reports[f"{precision}_emulation"] = emulation(dst_onnx)
        details["lowering_timings_s"], details["lowering_peak_rss_gib"] = timings, peaks
        gate = _worst(reports.values())
        failures = record.gate(gate)
        verification = {
            "reference": reference_label,
            "images": verify.source,
            "run_by": "the runtime's Describer" if run_final is not None else "ONNX Runtime (CPU)",
            # INT8 accuracy on a CPU depends on its integer kernels: what ran the check, and the session
            # options that made its integer products exact (`onnxrt.session_config`)
            "cpu_features": cpu_features(),
            "ort_session_config": session_config(),
            "reports": reports,
            "report": gate,
            "thresholds": record.threshold_record(),
            "failures": failures,
            "passed": not failures,
            "accepted_outside_thresholds": bool(failures and accept_fidelity),
        }
        for w in lowering.warnings:
            log.warning(w)
        if failures and not accept_fidelity:
            raise FidelityError(
                f"{precision.upper()} graph of {fp32_onnx.name} is outside thresholds on {verify.source or 'the verify set'}: "
                f"{'; '.join(failures)}; try --target-agreement 0.99 to keep blocks in higher precision, or "
                "--accept-fidelity to write it anyway (recorded in the manifest)"
            )
        details["warnings"] = lowering.warnings
        return LowerResult(precision=precision, onnx=dst_onnx, details=details, verification=verification,
                           warnings=lowering.warnings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
