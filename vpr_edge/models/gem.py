"""Generalised-mean pooling over patch features, as AnyLoc computes it.

The talk's formula is f_G = (1/n sum_i f_i^p)^(1/p) per dimension. Facet features are signed,
and AnyLoc's `scripts/dino_v2_gem.py` (default `gem_use_abs=False`) neither clamps nor takes
|x|: it averages x^p with the sign kept (p an integer, 3 by default) and takes a signed real
p-th root, sign(m) * |m|^(1/p). Its optional `gem_use_abs=True` uses mean(|x|^p)^(1/p). The
classic image-retrieval GeM clamps x to eps first, which on signed facets discards every
negative component; it is offered as mode='clamp' for CNN-style non-negative features.
AnyLoc L2-normalises descriptors before retrieval; here that final L2 is part of the head.
"""

from __future__ import annotations

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.models.vlad import NORM_EPS, l2_normalize

torch = lazy_import("torch")
nn = torch.nn

MODES = ("signed", "abs", "clamp")


def _int_pow(x: torch.Tensor, n: int) -> torch.Tensor:
    """x^n by repeated multiplication: sign-exact for negative x and exports as Mul, not Pow."""
    out = x
    for _ in range(n - 1):
        out = out * x
    return out


class GeM(nn.Module):
    """[B, N, D] -> [B, D], L2-normalised."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, mode: str = "signed"):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"GeM mode must be one of {MODES}, got {mode!r}")
        if p <= 0:
            raise ConfigError(f"GeM p must be > 0, got {p}")
        if mode == "signed" and float(p) != int(p):
            raise ConfigError(
                f"GeM mode 'signed' (AnyLoc's default) needs an integer p, got {p}; "
                "use mode='abs' or mode='clamp' for a fractional p"
            )
        self.p = float(p)
        self.eps = eps
        self.mode = mode

    def _power(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "signed":
            return _int_pow(x, int(self.p))
        if self.mode == "abs":
            x = x.abs()
        else:
            x = x.clamp_min(self.eps)
        return _int_pow(x, int(self.p)) if float(self.p) == int(self.p) else x.pow(self.p)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3:
            raise ConfigError(f"GeM expects features [B, N, D], got {tuple(features.shape)}")
        m = self._power(features).mean(dim=1)
        if self.mode == "signed":
            # |m| floored at eps^p: the root is then >= eps, so the gradient stays finite at m = 0
            # and values differ from the exact root only where it is below eps.
            g = torch.sign(m) * m.abs().clamp_min(self.eps**self.p).pow(1.0 / self.p)
        else:
            g = m.clamp_min(self.eps**self.p).pow(1.0 / self.p)
        return l2_normalize(g, eps=NORM_EPS)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def build_head(preset, *, vocabulary=None, pca=None, state_dict=None, seed: int = 0, origin: str = "") -> nn.Module:
    """The `gem` head kind (presets.HEADS): AnyLoc's signed GeM with the preset's p."""
    return GeM(p=preset.aggregator.gem_p)
