"""The BoQ head against a reference assembled from torch.nn modules as the BoQ README writes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vpr_edge import presets
from vpr_edge.models.boq import BoQ

# aggregator.* keys of the release checkpoints (resnet50_16384.pth, dinov2_12288.pth): the
# authors' src/boq.py with num_layers=2, i.e. nn.TransformerEncoderLayer / nn.MultiheadAttention names.
_ENCODER = [
    "encoder.self_attn.in_proj_weight", "encoder.self_attn.in_proj_bias",
    "encoder.self_attn.out_proj.weight", "encoder.self_attn.out_proj.bias",
    "encoder.linear1.weight", "encoder.linear1.bias", "encoder.linear2.weight", "encoder.linear2.bias",
    "encoder.norm1.weight", "encoder.norm1.bias", "encoder.norm2.weight", "encoder.norm2.bias",
]  # fmt: skip
_BLOCK = [
    *_ENCODER, "queries",
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "norm_q.weight", "norm_q.bias",
    "cross_attn.in_proj_weight", "cross_attn.in_proj_bias", "cross_attn.out_proj.weight", "cross_attn.out_proj.bias",
    "norm_out.weight", "norm_out.bias",
]  # fmt: skip
RELEASE_KEYS = [
    "proj_c.weight", "proj_c.bias", "norm_input.weight", "norm_input.bias",
    *(f"boqs.{i}.{k}" for i in range(2) for k in _BLOCK),
    "fc.weight", "fc.bias",
]  # fmt: skip


class RefBlock(nn.Module):
    """The README's BoQBlock, built from torch.nn modules."""

    def __init__(self, in_dim, num_queries, nheads):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=in_dim, nhead=nheads, dim_feedforward=4 * in_dim, batch_first=True, dropout=0.0
        )
        self.queries = nn.Parameter(torch.randn(1, num_queries, in_dim))
        self.self_attn = nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_q = nn.LayerNorm(in_dim)
        self.cross_attn = nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_out = nn.LayerNorm(in_dim)

    def forward(self, x):
        b = x.size(0)
        x = self.encoder(x)
        q = self.queries.repeat(b, 1, 1)
        q = q + self.self_attn(q, q, q)[0]
        q = self.norm_q(q)
        out, attn = self.cross_attn(q, x, x)
        return x, self.norm_out(out), attn.detach()


class RefBoQ(nn.Module):
    def __init__(self, in_channels, proj_channels, num_queries, num_layers, row_dim, nheads):
        super().__init__()
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList([RefBlock(proj_channels, num_queries, nheads) for _ in range(num_layers)])
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def forward(self, x):
        x = self.proj_c(x).flatten(2).permute(0, 2, 1)
        x = self.norm_input(x)
        outs, attns = [], []
        for blk in self.boqs:
            x, out, attn = blk(x)
            outs.append(out)
            attns.append(attn)
        out = self.fc(torch.cat(outs, dim=1).permute(0, 2, 1)).flatten(1)
        return nn.functional.normalize(out, p=2, dim=-1), attns


# (in_channels, proj_channels, queries, layers, row_dim, heads): 2 heads exercise the head split;
# the tiny preset's 32 channels give 1 head (dim // 64, at least 1).
CONFIGS = [(48, 128, 8, 2, 4, 2), (24, 32, 8, 2, 4, 1)]


def _pair(cfg, seed=0):
    torch.manual_seed(seed)
    ours = BoQ(*cfg[:5]).eval()
    ref = RefBoQ(*cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes, both ways
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("cfg", CONFIGS)
def test_boq_equals_torch_nn_reference_in_eval(cfg):
    ours, ref = _pair(cfg)
    x = torch.randn(3, cfg[0], 5, 7)
    with torch.no_grad():
        got, got_attn = ours(x, return_attention=True)
        want, want_attn = ref(x)
    assert got.shape == (3, cfg[1] * cfg[4])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_attn, want_attn):
        assert a.shape == (3, cfg[2], 35)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_boq_train_mode_equals_reference_and_trains_the_queries():
    ours, ref = _pair(CONFIGS[0], seed=1)
    ours.train()
    ref.train()
    x = torch.randn(2, 48, 4, 4)
    got, want = ours(x), ref(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (got * torch.randn_like(got)).sum().backward()
    for blk in ours.boqs:
        assert blk.query_cache is None  # training never uses the cache
        for p in (blk.queries, blk.self_attn.in_proj_weight, blk.norm_q.weight, blk.cross_attn.out_proj.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_boq_query_cache_is_used_in_eval_and_refreshed_on_changes():
    ours, ref = _pair(CONFIGS[0], seed=2)
    x = torch.randn(2, 48, 4, 5)
    blocks = list(ours.boqs)
    with torch.no_grad():
        ours(x)
        ours(x)
        ours(torch.randn(1, 48, 3, 3))
    assert [b.cache_computations for b in blocks] == [1, 1]  # computed once, then reused

    # in-place weight change (an optimiser step, a manual edit) -> recomputed, matches the reference
    with torch.no_grad():
        blocks[0].queries.add_(0.5)
        blocks[1].self_attn.in_proj_weight.mul_(1.1)
        got = ours(x)
    assert [b.cache_computations for b in blocks] == [2, 2]
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got, ref(x)[0], atol=1e-5, rtol=1e-5)

    # load_state_dict and train() drop the cache
    ours.load_state_dict(ref.state_dict())
    assert all(b.query_cache is None for b in blocks)
    with torch.no_grad():
        ours(x)
    ours.train()
    assert all(b.query_cache is None for b in blocks)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,dim,grid", [("boq-resnet50", 16384, (24, 24)), ("boq-dinov2", 12288, (23, 23))])
def test_boq_release_configs_on_meta_device(name, dim, grid):
    p = presets.get(name)
    assert p.descriptor_dim == dim and p.grid() == grid
    with torch.device("meta"):
        head = BoQ.from_preset(p).eval()
        out = head(torch.empty(2, p.feature_dim, *grid))
    assert out.shape == (2, dim) and head.out_dim == dim
    sd = head.state_dict()
    assert sorted(sd) == sorted(RELEASE_KEYS)
    c, q = p.aggregator.proj_channels, p.aggregator.num_queries
    assert sd["proj_c.weight"].shape == (c, p.feature_dim, 3, 3)
    assert sd["boqs.0.queries"].shape == (1, q, c)
    assert sd["boqs.1.encoder.linear1.weight"].shape == (4 * c, c)
    assert sd["boqs.0.cross_attn.in_proj_weight"].shape == (3 * c, c)
    assert sd["fc.weight"].shape == (p.aggregator.row_dim, 2 * q)
    assert head.boqs[0].self_attn.num_heads == c // 64  # 8 for ResNet50, 6 for DINOv2


def test_boq_key_layout_of_tiny_presets():
    for name in ("boq-resnet50", "boq-dinov2"):
        head = BoQ.from_preset(presets.get(name).tiny())
        assert sorted(head.state_dict()) == sorted(RELEASE_KEYS)


def test_boq_frozen_export_has_the_query_self_attention_as_a_constant(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ours, _ = _pair(CONFIGS[0], seed=3)
    ours.freeze()
    x = torch.randn(2, 48, 4, 5)
    prog = torch.onnx.export(ours, (x,), dynamo=True, opset_version=18, verbose=False)
    model = prog.model_proto
    ops = [n.op_type for n in model.graph.node]
    # per block: encoder self-attention + cross-attention only
    assert ops.count("Softmax") == 2 * len(ours.boqs)
    assert "LayerNormalization" in ops and "Conv" in ops
    assert not any("queries" in i.name for i in model.graph.initializer)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, ours(x).numpy(), atol=1e-5)
