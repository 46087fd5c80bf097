"""Doctor: what this machine can run (`environment`), and does an artifact agree across the backends
available here (`diagnose`: ONNX Runtime, the TensorRT engine, the PyTorch reference, all through the
runtime's Describer on the same images); `engine_check` compares a built engine with ONNX Runtime."""
