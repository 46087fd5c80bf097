"""Precision in the graph, and TensorRT engines built from it.

Steps, each taking a file or artifact and making the next (Polygraphy-style):

- `fp16.fp16_from_onnx`      FP32 ONNX -> FP16 ONNX with FP32 islands (`islands.py`) and an
                              overflow guard (`fp16.find_fp16_overflow`)
- `int8.int8_from_onnx`      FP32 ONNX -> QDQ INT8 ONNX (symmetric, per-channel weights)
- `fallback.fallback_search` fewest blocks/nodes kept in higher precision for a target agreement
- `lower.lower_onnx`         all of the above + verification gate (what `vpr-export --precision` runs)
- `build.build_engine`       ONNX artifact -> strongly typed TensorRT engine artifact
- `emulate.fp16_emulation_graph`  CPU-faithful FP16 numerics for verification with ONNX Runtime

Heavy dependencies (onnx, onnxruntime, onnxconverter-common, tensorrt, torch) are imported inside
functions, so importing this package, `cli` or `doctor` costs nothing.
"""
