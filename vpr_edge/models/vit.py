"""DINOv2 ViT-S/B/L/G/14 (with or without registers) and DINO v1 ViT-S/8, as one class.

Built from timm's blocks so parameter names are the official ones (a checkpoint is a file format):
patch_embed.proj, cls_token, pos_embed, register_tokens, mask_token, blocks.N.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm. The only internal difference is
ViT-G's SwiGLU, held as timm's packed GLU (mlp.fc1/fc2); weights.py renames it to dinov2's w12/w3.

Position embeddings are resampled exactly as dinov2 / dino-vit-features do (scale factors with a
+0.1 offset, not a target size): timm's size-based resampling differs by up to 0.1 per entry and
lowers facet cosine similarity to ~0.98 against the reference.
"""

from __future__ import annotations

import math
from functools import partial

from vpr_edge.errors import ConfigError, InputError
from vpr_edge.lazy import lazy_import
from vpr_edge.presets import Backbone

torch = lazy_import("torch")
_timm_vit = lazy_import("timm.models.vision_transformer")
_timm_layers = lazy_import("timm.layers")

nn = torch.nn
F = torch.nn.functional
Tensor = torch.Tensor


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of dinov2's SwiGLUFFNFused (4096 for ViT-G's 1536)."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _swiglu(in_features: int, hidden_features: int, act_layer=None, norm_layer=None, bias=True, drop=0.0, **dd):
    # timm's Block hands us int(dim * mlp_ratio); dinov2 shrinks it by 2/3 and rounds up to 8.
    hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
    return _timm_layers.GluMlp(
        in_features, 2 * hidden, act_layer=nn.SiLU, bias=bias, drop=drop, gate_last=False, **dd
    )


def token_grid(spec: Backbone, image_size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (rows, cols) for an input of (H, W); refuses sizes that do not tile exactly."""
    h, w = int(image_size[0]), int(image_size[1])
    p, s = spec.patch_size, spec.effective_stride
    if h < p or w < p or (h - p) % s or (w - p) % s:
        raise InputError(
            f"input {h}x{w} does not tile with patch {p} / stride {s} for {spec.arch}: "
            f"expected (size - {p}) to be a non-negative multiple of {s}; resize or crop the input"
        )
    return (1 + (h - p) // s, 1 + (w - p) // s)


def interpolate_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """dinov2's `interpolate_pos_encoding` as a function of the token grid.

    `pos_embed` is [1, 1 + M*M, D] (CLS entry first). Returns [1, 1 + gh*gw, D] in its dtype,
    resampled in float32. With an offset, the bicubic kernel gets scale factors (g + offset) / M
    (dim 2 = rows, dim 3 = cols; dinov2 and dino-vit-features name dim 2 "w" but map it the same
    way), which is not the same resampling as asking for an output size. No resampling when the
    grid already is M x M.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ConfigError(f"position embedding holds {n} patch entries, expected a square grid")
    gh, gw = int(grid[0]), int(grid[1])
    if gh == m and gw == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((gh + offset) / m, (gw + offset) / m), "recompute_scale_factor": False}
    else:
        kwargs = {"size": (gh, gw)}
    patch = F.interpolate(patch, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
    if tuple(patch.shape[-2:]) != (gh, gw):
        raise ConfigError(f"position embedding resampled to {tuple(patch.shape[-2:])}, expected {(gh, gw)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
    return torch.cat((pos_embed[:, :1].float(), patch), dim=1).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    """Conv patch embedding; the stride is a knob (AnyLoc's DINO v1 path overlaps patches)."""

    def __init__(self, patch_size: int, stride: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A DINOv2 / DINO ViT holding blocks [0, num_blocks) only; `norm` only when all are built.

    forward(x [B,3,H,W]) -> tokens [B, num_prefix_tokens + gh*gw, D] after the built blocks, with
    the final norm applied when it exists. forward_features skips the norm (BoQ uses that).
    """

    def __init__(
        self,
        spec: Backbone,
        num_blocks: int | None = None,
        *,
        init_values: float = 1.0,
        include_norm: bool | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if spec.family not in ("dinov2", "dino"):
            raise ConfigError(f"VisionTransformer builds dinov2/dino backbones, got family {spec.family!r}")
        depth = spec.depth if num_blocks is None else int(num_blocks)
        if not 0 <= depth <= spec.depth:
            raise ConfigError(f"{spec.arch}: num_blocks must be in 0..{spec.depth}, got {num_blocks}")
        d = spec.embed_dim
        self.spec = spec
        self.embed_dim = d
        self.num_heads = spec.num_heads
        self.patch_size = spec.patch_size
        self.stride = spec.effective_stride
        self.num_registers = spec.registers
        self.num_prefix_tokens = 1 + spec.registers
        self.pos_grid = spec.pos_grid

        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.pos_grid**2, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, d)) if spec.registers else None
        # Unused at inference, but part of the official file (strict loading, parameter counts).
        self.mask_token = nn.Parameter(torch.zeros(1, d)) if spec.family == "dinov2" else None
        self.patch_embed = PatchEmbed(spec.patch_size, spec.effective_stride, d)

        swiglu = spec.mlp == "swiglu"
        block = partial(
            _timm_vit.Block,
            dim=d,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            qkv_bias=True,
            init_values=init_values if spec.layerscale else None,
            norm_layer=partial(nn.LayerNorm, eps=spec.ln_eps),
            act_layer=nn.SiLU if swiglu else nn.GELU,
            mlp_layer=_swiglu if swiglu else _timm_layers.Mlp,
        )
        self.blocks = nn.ModuleList([block() for _ in range(depth)])
        if include_norm is None:
            include_norm = depth == spec.depth
        self.norm = nn.LayerNorm(d, eps=spec.ln_eps) if include_norm else None

        # Interpolated table for one fixed input size: a constant in an exported graph.
        self.register_buffer("pos_embed_fixed", None, persistent=False)
        self._fixed_grid: tuple[int, int] | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)
        if image_size is not None:
            self.set_image_size(image_size)

    # -- position embedding -------------------------------------------------------------------
    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(self.spec, image_size)

    @property
    def grid(self) -> tuple[int, int] | None:
        """Token grid of the fixed input size (None until set_image_size)."""
        return self._fixed_grid

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Compute the interpolated position table once for inputs of `image_size` (H, W)."""
        self._fixed_grid = self.grid_for(image_size)
        self._refresh_fixed_pos_embed()

    def _refresh_fixed_pos_embed(self) -> None:
        if self._fixed_grid is None:
            return
        with torch.no_grad():
            table = interpolate_pos_embed(
                self.pos_embed.detach(), self._fixed_grid, self.spec.pos_offset, self.spec.pos_antialias
            )
        self.pos_embed_fixed = table.clone()

    def train(self, mode: bool = True):
        # pos_embed may have changed (training, weights copied in) since the table was made;
        # the table is one small bicubic resample, so eval() simply recomputes it.
        out = super().train(mode)
        if not mode:
            self._refresh_fixed_pos_embed()
        return out

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        use_fixed = (
            self.pos_embed_fixed is not None
            and self._fixed_grid == tuple(grid)
            and not (self.training and torch.is_grad_enabled())
        )
        if use_fixed:
            return self.pos_embed_fixed
        return interpolate_pos_embed(self.pos_embed, grid, self.spec.pos_offset, self.spec.pos_antialias)

    # -- forward --------------------------------------------------------------------------------
    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Patch tokens with CLS and position embedding, then registers (no position on those)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        grid = self.grid_for((x.shape[-2], x.shape[-1]))
        b = x.shape[0]
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        t = t + self.pos_embed_for(grid)
        if self.register_tokens is not None:
            t = torch.cat((t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]), dim=1)
        return t

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens after all built blocks, without the final norm."""
        t = self.prepare_tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return t

    def forward(self, x: Tensor) -> Tensor:
        t = self.forward_features(x)
        return self.norm(t) if self.norm is not None else t

    def truncated(self, num_blocks: int) -> "VisionTransformer":
        """A ViT running blocks [0, num_blocks) that shares this one's parameters and modules.

        No final norm and no mask token: the later blocks are not submodules of the result, so
        an exported or counted cut model holds only what it computes.
        """
        if not 0 <= num_blocks <= len(self.blocks):
            raise ConfigError(f"cannot cut {len(self.blocks)} blocks to {num_blocks}")
        with torch.device("meta"):  # an empty shell: its modules are the shared ones assigned below
            cut = VisionTransformer(self.spec, num_blocks=0, include_norm=False)
        cut.patch_embed = self.patch_embed
        cut.cls_token = self.cls_token
        cut.pos_embed = self.pos_embed
        cut.register_tokens = self.register_tokens
        cut.mask_token = None
        cut.blocks = nn.ModuleList(list(self.blocks[:num_blocks]))
        cut.train(self.training)
        cut._fixed_grid = self._fixed_grid
        cut._refresh_fixed_pos_embed()
        return cut


def _refresh_after_load(module: VisionTransformer, incompatible_keys) -> None:
    module._refresh_fixed_pos_embed()
