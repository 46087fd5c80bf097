"""PyTorch -> ONNX artifacts (cut at the facet block, fixed size, optional whole image->descriptor graph),
verified against the PyTorch reference with ONNX Runtime."""
