"""Benchmarks (`vpr-edge bench`): accuracy, fidelity, latency and memory of exported variants on a
dataset (dataset_bench), IVF-PQ on a synthetic map (map_bench), and a long-run memory soak (soak).
Measuring helpers live in measure, outputs in record/report/plots/match_grid."""
