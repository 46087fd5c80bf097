"""An outlier stress model: random-weight DINOv2 with the massive activations trained ViTs carry.

Why: random weights give well-behaved activations, so every INT8 result on them is optimistic. Trained
DINOv2 / large ViTs carry a few patch tokens whose residual norm is 10-100x the others from a middle block
on ("high-norm tokens", Darcet et al. 2024, "Vision Transformers Need Registers"), made by a few MLP units
whose activation spikes at those tokens, written into a few fixed residual channels ("massive
activations", Sun et al. 2024). A per-tensor INT8 scale on the spiking MLP activation (the input of fc2)
rounds every other token's input to zero. No trained weights can be fetched here, so this module plants
that structure into seeded random weights, as weights only (a stressed model saves in the official key
layout and loads into the authors' code like any checkpoint).

The transformation (`plant_outliers_`, seeded, deterministic), at block k = depth // 3 (a middle block; it
must be one the model computes):
- a marker: `tokens` patch positions of the model's token grid (seeded) get +M along a direction spread
  over `marker_channels` residual channels (so no single early channel becomes an outlier of its own),
  written into the position embedding so that dinov2's own bicubic resampling (scale factors + 0.1) gives
  exactly that delta at the model's input size (a minimum-norm least-squares solve through the resampling,
  which is linear); at other input sizes the marker smears over neighbouring tokens;
- a detector: one hidden unit u of block k's MLP reads the marker direction of norm2's output and fires only at marked
  tokens (bias below every unmarked token); for SwiGLU (ViT-G) the unit's gate half does, its linear half is
  a constant 1;
- the spike: unit u's activation at those tokens is `activation_ratio` x the median |fc2 input| of the
  block, and fc2 writes it into two residual channels, so the marked tokens leave block k with
  `norm_ratio` x the median token norm; later blocks see those tokens through their LayerNorms as large
  values in those two channels (the channel outliers massive tokens leave behind).
Amplitudes are set from a forward pass of blocks 0..k on seeded noise images (three contrasts), so the ratios
hold at any width, roughly: on Corridor images (benchmarks/results/int8_outliers/ratios.json) every preset shows
its 4 massive tokens, token-norm ratio 59-60 (ViT-S, ViT-B) and 30 (ViT-G), fc2-input max/median 3000-7000; the
stated ratios are targets on noise, `outlier_stats` measures them on real images (what README and the tests quote).
For comparison, the issue's measurement on hand-planted ViT-S: fc2-input max/median ~6500; the literature's
high-norm tokens: 10-100x the median norm.
Not modelled: attention sinks (massive tokens drawing most of the attention).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")

OUTLIER_WEIGHTS = "random-outliers"  # the --weights value


@dataclass(frozen=True)
class OutlierSpec:
    tokens: int = 4  # massive patch tokens per image
    norm_ratio: float = 50.0  # their residual norm after the planting block / the median token's
    activation_ratio: float = 3000.0  # peak of the spiking fc2 input / its median |value|
    detector_sigma: float = 12.0  # marker after norm2, in units of its spread over unmarked tokens (capped by the width)
    marker_channels: int = 0  # residual channels the marker is spread over (each carries 1/sqrt(n)); 0: width // 48

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT = OutlierSpec()


def plant_block(depth: int) -> int:
    return depth // 3


def _vit(module):
    from vpr_edge.models.vit import VisionTransformer

    if isinstance(module, VisionTransformer):
        return module
    for sub in module.modules():
        if isinstance(sub, VisionTransformer):
            return sub
    raise ConfigError("--weights random-outliers plants massive activations into DINOv2 ViTs; this backbone has none")


def _rng(seed: int, what: str) -> np.random.Generator:
    return np.random.default_rng((seed * 1_000_003 + zlib.crc32(what.encode())) % 2**63)


def _resampling_matrix(vit, grid: tuple[int, int]):
    """[gh*gw, M*M]: dinov2's position resampling as a matrix (bicubic resampling is linear in the table)."""
    from vpr_edge.models.vit import interpolate_pos_embed

    n = vit.pos_grid**2
    basis = torch.cat([torch.zeros(1, 1, n), torch.eye(n)[None]], dim=1)  # [1, 1 + n, n]: one channel per entry
    out = interpolate_pos_embed(basis, grid, vit.spec.pos_offset, vit.spec.pos_antialias)
    return out[0, 1:].double().numpy()


def _mlp_input(blk, x):
    """norm2's output and the fc2 input of a timm Block for residual input x."""
    h = x + blk.ls1(blk.attn(blk.norm1(x)))
    return h, blk.norm2(h)


def _hidden(mlp, z):
    """What fc2 reads (Mlp: act(fc1); GluMlp: act(x1) * x2, gate first as dinov2's SwiGLU)."""
    y = mlp.fc1(z)
    if hasattr(mlp, "chunk_dim"):
        a, b = y.chunk(2, dim=mlp.chunk_dim)
        return mlp.act(a) * b if not mlp.gate_last else a * mlp.act(b)
    return mlp.act(y)


def plant_outliers_(model, image_size: tuple[int, int], seed: int = 0, spec: OutlierSpec = DEFAULT):
    """Plant massive tokens into `model` (a VisionTransformer or a module holding one), in place."""
    vit = _vit(model)
    k = plant_block(vit.spec.depth)
    if k >= len(vit.blocks):
        raise ConfigError(f"--weights random-outliers plants at block {k}; this cut of {vit.spec.arch} computes {len(vit.blocks)} blocks")
    grid = vit.grid_for(image_size)
    g = grid[0] * grid[1]
    d = vit.embed_dim
    if spec.tokens >= g // 2:
        raise ConfigError(f"{spec.tokens} massive tokens in a {grid[0]}x{grid[1]} grid is not 'a few'")
    rng = _rng(seed, "outliers")
    n_mark = max(1, min(spec.marker_channels or d // 48, d // 8))
    picked = [int(c) for c in rng.choice(d, size=n_mark + 2, replace=False)]
    marker, (out1, out2) = picked[:n_mark], picked[n_mark:]
    direction = torch.zeros(d)
    direction[marker] = 1.0 / math.sqrt(n_mark)
    where = np.sort(rng.choice(g, size=spec.tokens, replace=False))
    blk = vit.blocks[k]
    mlp = blk.mlp
    unit = int(rng.integers(0, mlp.fc2.in_features))
    glu = hasattr(mlp, "chunk_dim")
    # noise at three contrasts, so the detector's threshold holds for images brighter or flatter than one noise level
    n_img = 3
    noise = torch.from_numpy(_rng(seed, "noise images").standard_normal((n_img, 3, *image_size)).astype(np.float32))
    noise *= torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        def residual_at_block():
            t = vit.prepare_tokens(noise)
            for b in vit.blocks[:k]:
                t = b(t)
            return t[:, vit.num_prefix_tokens:]

        # 1. the marker: +m along `direction` at `where`, m set from the token spread at block k
        x = residual_at_block()
        sigma = float((x @ direction).std())
        v = min(spec.detector_sigma, 0.9 * math.sqrt(d))  # LayerNorm bounds one channel by sqrt(d)
        m = v * sigma / math.sqrt(max(1e-6, 1 - v * v / d))
        target = np.zeros(g)
        target[where] = m
        k_mat = _resampling_matrix(vit, grid)
        delta = np.linalg.lstsq(k_mat, target, rcond=None)[0]
        got = k_mat @ delta
        if g > k_mat.shape[1]:  # upsampling (tiny test configs): the delta cannot be exact; bumps instead
            delta *= m / got[where].min()
            got = k_mat @ delta
            where = np.flatnonzero(got >= 0.9 * m)
        clear = got < 0.1 * m  # tokens the detector must stay off at (bump flanks may fire: measured, not assumed)
        vit.pos_embed[0, 1:] += torch.from_numpy(delta).float()[:, None] * direction[None, :]
        vit._refresh_fixed_pos_embed()
        vit.set_image_size(image_size)

        # 2. the detector: unit fires only at marked tokens (threshold between them and the rest)
        x = residual_at_block()
        h, z = _mlp_input(blk, x)
        zc = z @ direction
        marked = torch.zeros(g, dtype=torch.bool)
        marked[torch.from_numpy(where)] = True
        lo, hi = float(zc[:, torch.from_numpy(clear)].max()), float(zc[:, marked].min())
        if not hi > lo:
            raise ConfigError(f"outlier marker did not separate the marked tokens at block {k} ({hi:.3g} <= {lo:.3g})")
        # exact markers: a wide margin on both sides (real images move both); bumps (tiny grids): near the marked
        # tokens so the flanks stay mostly off
        threshold = lo + 0.3 * (hi - lo) if g <= k_mat.shape[1] else hi - 0.25 * (hi - lo)
        rows = [unit] if not glu else [unit, unit + mlp.fc2.in_features]
        mlp.fc1.weight[rows] = 0.0
        mlp.fc1.bias[rows] = 0.0
        if glu:
            mlp.fc1.bias[rows[1]] = 1.0  # the linear half: a constant 1 (gate_last False: act(first) * second)
        mlp.fc1.weight[unit] = direction
        mlp.fc1.bias[unit] = -threshold
        hid = _hidden(mlp, z)
        med = float(hid.abs().median())
        peak = float(hid[..., unit][:, marked].min())
        gain = spec.activation_ratio * med / peak
        mlp.fc1.weight[unit] *= gain
        mlp.fc1.bias[unit] *= gain
        hid = _hidden(mlp, z)
        peak_u = hid[..., unit][:, marked]  # [n_img, tokens]

        # 3. the spike into two residual channels: norm_ratio x the median token norm after the block
        mlp.fc2.weight[:, unit] = 0.0
        out = h + blk.ls2(mlp(z))
        norm_med = float(out.norm(dim=-1).median())
        gamma = blk.ls2.gamma if hasattr(blk.ls2, "gamma") else torch.ones(d)
        value = spec.norm_ratio * norm_med / math.sqrt(2) / float(peak_u.mean())
        mlp.fc2.weight[out1, unit] = value / float(gamma[out1])
        mlp.fc2.weight[out2, unit] = -value / float(gamma[out2])
    return {
        "block": k, "token_positions": [int(w) for w in where], "exact_marker": bool(g <= k_mat.shape[1]), "grid": list(grid), "marker_channels": marker,
        "massive_channels": [out1, out2], "mlp_unit": unit, **spec.to_dict(),
    }


def outlier_stats(model, images, block: int | None = None) -> dict[str, float]:
    """Measured on `images` [B, 3, H, W]: max/median token norm after the planting block, max/median |fc2 input|
    of that block, and max/median of per-channel max |value| of the next block's and of block 0's norm1 output
    (what their qkv MatMuls read): the ratios the stress model is stated by."""
    vit = _vit(model)
    k = plant_block(vit.spec.depth) if block is None else block
    later = min(len(vit.blocks) - 1, k + 1)
    got: dict[str, Any] = {}

    def keep(name):
        def hook(mod, inp, out):
            got[name] = (inp[0] if name == "fc2_in" else out).detach()
        return hook

    hooks = [vit.blocks[k].register_forward_hook(keep("block_out")),
             vit.blocks[k].mlp.fc2.register_forward_hook(keep("fc2_in")),
             vit.blocks[later].norm1.register_forward_hook(keep("norm1_later")),
             vit.blocks[0].norm1.register_forward_hook(keep("norm1_first"))]
    try:
        with torch.no_grad():
            t = vit.prepare_tokens(images)
            for b in vit.blocks[: later + 1]:
                t = b(t)
    finally:
        for h in hooks:
            h.remove()
    p = vit.num_prefix_tokens
    norms = got["block_out"][:, p:].norm(dim=-1)
    fc2 = got["fc2_in"][:, p:].abs()
    chan = got["norm1_later"][:, p:].abs().amax(dim=(0, 1))
    first = got["norm1_first"][:, p:].abs().amax(dim=(0, 1))
    return {
        "block": k,
        "token_norm_ratio": float(norms.max() / norms.median()),
        "fc2_input_max_over_median": float(fc2.max() / fc2.median()),
        "later_norm1_channel_max_over_median": float(chan.max() / chan.median()),
        "first_norm1_channel_max_over_median": float(first.max() / first.median()),  # the marker must not show here
        "tokens_over_10x_median_norm": float((norms > 10 * norms.median()).float().sum(dim=1).mean()),
    }
