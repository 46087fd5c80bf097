"""Precision in the graph: FP16 with FP32 islands, INT8 as explicit Q/DQ, the fallback search, and the
verification gate, driven by one table of precisions (`table.PRECISIONS`)."""
