"""A toy ViT + hard-VLAD graph, exported like the real ones: the test fixture of the FP16/INT8 tests.

Same op pattern as AnyLoc on DINOv2 at toy size: patch Conv, CLS + position embedding, pre-norm
blocks `blocks.<i>` (LayerNorm, qkv Linear, QK^T MatMul, Softmax, proj, GELU MLP), then per-patch
L2, hard VLAD (ArgMax, one-hot MatMul, residuals, intra- and final L2). Exported with the dynamo
exporter (opset 18, dynamic batch), so node metadata is what real exports carry.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

from vpr_edge.lazy import lazy_import


def _modules():
    torch = lazy_import("torch")
    nn = torch.nn
    F = torch.nn.functional

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
            x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
            return self.proj(x)

    class Mlp(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.fc1 = nn.Linear(dim, 4 * dim)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(4 * dim, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class HardVlad(nn.Module):
        def __init__(self, clusters: int, dim: int):
            super().__init__()
            self.register_buffer("centers", F.normalize(torch.randn(clusters, dim), dim=1))

        def forward(self, x):
            x = F.normalize(x, dim=-1)
            assign = F.one_hot((x @ self.centers.t()).argmax(-1), self.centers.shape[0]).to(x.dtype)
            resid = assign.transpose(1, 2) @ x - assign.sum(1).unsqueeze(-1) * self.centers
            resid = F.normalize(resid, dim=-1)
            return F.normalize(resid.flatten(1), dim=-1)

    class ToyVit(nn.Module):
        def __init__(self, dim: int, depth: int, heads: int, patch: int, grid: tuple[int, int], clusters: int, scope: str):
            super().__init__()
            self.scope = scope
            self.patch_embed = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], dim) * 0.02)
            self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
            self.head = HardVlad(clusters, dim)

        def features(self, images):
            x = self.patch_embed(images).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            return x[:, 1:]

        def forward(self, images):
            x = self.features(images)
            return x if self.scope == "backbone" else self.head(x)

    return torch, ToyVit


def export_toy(
    dst: str | Path,
    *,
    dim: int = 32,
    depth: int = 4,
    heads: int = 2,
    patch: int = 7,
    image_size: tuple[int, int] = (112, 154),
    clusters: int = 4,
    scope: str = "descriptor",
    seed: int = 0,
    residual_scale: float = 0.1,
    fit_images: np.ndarray | None = None,
) -> Path:
    """Export the toy model with random weights to `dst` (ONNX, opset 18, dynamic batch).

    Defaults (patch 7: 352 tokens, 4 clusters, residual_scale 0.1) give descriptors whose Corridor
    rankings are stable enough for FP16 agreement to be measured at all. With random weights some
    rankings are near-ties, and a token that changes cluster under rounding moves its image's
    descriptor (intra-normalised residuals) by more than such a tie: more tokens and fewer
    cluster boundaries make that rarer.
    residual_scale multiplies the attention/MLP output projections (like DINOv2's LayerScale, small
    values keep the image content in the tokens). fit_images: VLAD centres are fitted on their
    token features (a few k-means steps), as AnyLoc fits its vocabulary on the map."""
    torch, ToyVit = _modules()
    torch.manual_seed(seed)
    grid = (image_size[0] // patch, image_size[1] // patch)
    model = ToyVit(dim, depth, heads, patch, grid, clusters, scope).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.mul_(residual_scale)
                lin.bias.mul_(residual_scale)
        if fit_images is not None:
            feats = model.features(torch.from_numpy(np.asarray(fit_images, np.float32)))
            model.head.centers.copy_(torch.from_numpy(_kmeans(feats.reshape(-1, dim).numpy(), clusters, seed)))
    x = torch.randn(2, 3, *image_size)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = "features" if scope == "backbone" else "descriptor"
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            str(dst),
            dynamo=True,
            opset_version=18,
            input_names=["images"],
            output_names=[out],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=64)}},
            external_data=False,
            verbose=False,
        )
    return dst


def _kmeans(x: np.ndarray, k: int, seed: int, steps: int = 10) -> np.ndarray:
    """Spherical k-means (cosine), as AnyLoc's vocabulary: unit-norm centres."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), size=k, replace=False)]
    for _ in range(steps):
        a = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].sum(0)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _toy_cached(cfg: tuple, fit_key: str | None) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="vpr-edge-toy-"))
    kwargs = dict(cfg)
    if fit_key is not None:
        kwargs["fit_images"] = _FIT[fit_key]
    return export_toy(folder / "model.onnx", **kwargs)


_FIT: dict[str, np.ndarray] = {}


def toy_onnx(fit_images: np.ndarray | None = None, **cfg) -> Path:
    """`export_toy` once per process and configuration (tests share it; copy before modifying)."""
    key = None
    if fit_images is not None:
        import hashlib

        key = hashlib.sha1(np.ascontiguousarray(fit_images, np.float32).tobytes()).hexdigest()
        _FIT[key] = fit_images
    return _toy_cached(tuple(sorted(cfg.items())), key)


def plant_overflow(src: str | Path, dst: str | Path, block: int, scale: float = 2e5) -> Path:
    """Copy of `src` whose block `block` MLP hidden activations are `scale` times larger (fc1 x scale,
    fc2 / scale): same function in exact arithmetic up to GELU's curvature, FP32 is fine, FP16
    overflows in that block only."""
    from vpr_edge.engines import graph as G

    onnx = lazy_import("onnx")
    numpy_helper = onnx.numpy_helper
    model = G.load(src)
    idx = G.GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    done = {"fc1": 0, "fc2": 0}
    for node in model.graph.node:
        hit = G.block_of(node)
        if not hit or hit[1] != block:
            continue
        scopes = dict((p.key, p.value) for p in node.metadata_props).get("pkg.torch.onnx.name_scopes", "")
        for which, factor in (("mlp.fc1", scale), ("mlp.fc2", 1.0 / scale)):
            if f"blocks.{block}.{which}'" not in scopes or node.op_type not in ("MatMul", "Add", "Gemm"):
                continue
            if which == "mlp.fc2" and node.op_type == "Add":
                continue  # fc2 bias is added after the rescale: leave it
            for t in node.input:
                if t in inits and idx.is_constant(t):
                    arr = numpy_helper.to_array(inits[t]).astype(np.float32) * np.float32(factor)
                    inits[t].CopyFrom(numpy_helper.from_array(arr, t))
                    done[which.split(".")[1]] += 1
    if not done["fc1"] or not done["fc2"]:
        raise ValueError(f"could not find block {block}'s MLP weights in {src} (found {done})")
    return G.save(model, dst)
