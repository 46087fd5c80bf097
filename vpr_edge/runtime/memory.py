"""How many images a batch can hold in a memory budget, estimated from the artifact before running it.

A ViT's working memory is dominated by attention: ONNX Runtime materialises the [heads, N, N] scores of a
block several times over (QK^T, the scaled scores, the softmax and their arena copies). Measured with the
full-size `anyloc-dino` backbone artifact (ViT-S/8 at stride 4, N = 3026 tokens, 6 heads, FP32; this CPU,
ONNX Runtime 1.32, `/tmp/t_mem.py` in issue 14's note): peak RSS 1332 / 2461 / 4775 MB at batch 1 / 2 / 4,
i.e. 1.15 GB per image = 5.2x one block's scores. The estimate below is 5.5x the scores plus the token
activations (MLP hidden layer included) 16x over, in the graph's activation type; convolutional trunks
(ResNet) keep a few of their largest feature maps. It is an estimate with a margin, checked against
measurements in benchmarks/results/memory.

The default batch is the largest of 1, 2, 4, 8 whose activations fit `DEFAULT_BUDGET_BYTES` (1.2 GB, so a
runtime stays within its artifact size + 1.5 GB with the interpreter and libraries), and never above 8.
"""

from __future__ import annotations

from vpr_edge.presets import Preset

DEFAULT_BUDGET_BYTES = int(1.2 * 2**30)
MAX_DEFAULT_BATCH = 8
ATTENTION_COPIES = 5.5
TOKEN_COPIES = 16


def activation_bytes(preset: Preset, dtype_bytes: int = 4) -> int:
    """Estimated peak working memory of one image through the artifact's network."""
    b = preset.backbone
    h, w = preset.preprocess.image_size
    if b.family == "resnet":
        # the widest early maps: 256 channels at stride 4 (layer1), a few of them alive at once
        return int(8 * 4 * b.resnet_width * (h // 4) * (w // 4) * dtype_bytes)
    gh, gw = preset.grid()
    n = gh * gw + 1 + b.registers
    scores = b.num_heads * n * n * dtype_bytes
    tokens = n * b.embed_dim * dtype_bytes * (1 + b.mlp_ratio)
    return int(ATTENTION_COPIES * scores + TOKEN_COPIES * tokens)


def default_batch(preset: Preset, dtype_bytes: int = 4, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """The largest power of two <= MAX_DEFAULT_BATCH whose estimated activations fit the budget (at least 1)."""
    per_image = max(1, activation_bytes(preset, dtype_bytes))
    batch = 1
    while batch * 2 <= MAX_DEFAULT_BATCH and batch * 2 * per_image <= budget_bytes:
        batch *= 2
    return batch
