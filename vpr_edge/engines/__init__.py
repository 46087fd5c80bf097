"""Precision in the graph, and TensorRT engines built from it.

- `precision/`: one record per precision (`precision.table`: how to lower, how to verify, which
  nodes stay in higher precision, the gate's thresholds) and the steps behind them:
  `fp16.fp16_from_onnx` (FP16 with FP32 islands, `islands.py`, overflow guard), `int8.int8_from_onnx`
  (QDQ INT8, symmetric per-channel weights, `minmax.py` calibration), `fallback.fallback_search`
  (fewest blocks/nodes kept in higher precision), `emulate.py` (CPU-faithful FP16 numerics),
  `rewrites.py` (exact graph rewrites), and `lower.lower_onnx`, which chains them.
- `tensorrt/`: `build.build_engine` (ONNX artifact -> strongly typed TensorRT engine artifact), the CUDA
  bindings (`cuda_api.py`) and whether an engine can run here (`environment.py`).
- `graph.py`: reading exported ONNX graphs (node -> transformer block, producers/consumers, FLOPs).

Heavy dependencies (onnx, onnxruntime, onnxconverter-common, tensorrt) are imported inside functions,
so the runtime can read the precision table without them.
"""
