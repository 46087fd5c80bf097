"""The Bag-of-Queries head (BoQ, CVPR 2024), exportable, in the release checkpoints' key layout.

Follows the authors' `src/boq.py` (the code behind `get_trained_boq` in hubconf.py and the
README): 3x3 conv projection -> tokens -> LayerNorm -> `num_layers` BoQ blocks -> the blocks'
query outputs concatenated [B, L*Q, dim] -> Linear(L*Q -> row_dim) over the query axis ->
flatten -> L2. Each block is a post-norm ReLU TransformerEncoderLayer (ff = 4*dim, dropout 0)
on the tokens, learned queries refined by self-attention (q + MHA(q, q, q), then norm_q), and
cross-attention from the queries to the tokens (then norm_out). Heads = dim // 64 (8 for the
ResNet50 head, 6 for the DINOv2 head). An older root-level boq.py used 8 heads and torch's default
ff=2048; the release checkpoints were made with the src/ version.

Attention and the encoder layer are written out here with the state-dict names of
torch.nn.MultiheadAttention / TransformerEncoderLayer (in_proj_weight, in_proj_bias, out_proj,
linear1, linear2, norm1, norm2), so `aggregator.*` keys of resnet50_16384.pth / dinov2_12288.pth
load as they are, and export never meets torch's fused fast path.

The query self-attention does not depend on the image: in eval it is computed once and cached
(the README says so). The cache is dropped on train(), load_state_dict() and any in-place change
of the parameters it depends on; `freeze()` computes it ahead of export so the exported graph
holds it as a constant.
"""

from __future__ import annotations

import math

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.models.vlad import l2_normalize

torch = lazy_import("torch")
nn = torch.nn
F = torch.nn.functional


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first, same q/k/v dim, bias, no dropout) written out plainly."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # torch's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output [B, Lq, dim], attention weights averaged over heads [B, Lq, Lk])."""
        b, lq, d = query.shape
        lk = key.shape[1]
        h = self.num_heads
        hd = d // h
        wq, wk, wv = self.in_proj_weight.chunk(3, dim=0)
        bq, bk, bv = self.in_proj_bias.chunk(3, dim=0)
        q = F.linear(query, wq, bq).reshape(b, lq, h, hd).transpose(1, 2)
        k = F.linear(key, wk, bk).reshape(b, lk, h, hd).transpose(1, 2)
        v = F.linear(value, wv, bv).reshape(b, lk, h, hd).transpose(1, 2)
        attn = torch.softmax((q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1), dim=-1)  # [B, h, Lq, Lk]
        out = (attn @ v).transpose(1, 2).reshape(b, lq, d)
        return self.out_proj(out), attn.mean(dim=1)


class TransformerEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer(batch_first=True, norm_first=False, activation=relu, dropout=0)."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class BoQBlock(nn.Module):
    def __init__(self, dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.encoder = TransformerEncoderLayer(dim, num_heads, 4 * dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = MultiheadAttention(dim, num_heads)
        self.norm_out = nn.LayerNorm(dim)
        # Eval-time cache of the refined queries [1, Q, dim]; not in the state dict.
        self.register_buffer("query_cache", None, persistent=False)
        self._cache_key: tuple | None = None
        self.cache_computations = 0  # how often the refined queries were computed for the cache
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    # -- the image-independent part ---------------------------------------------------------
    def refined_queries(self) -> torch.Tensor:
        q = self.queries
        return self.norm_q(q + self.self_attn(q, q, q)[0])

    def _cache_params(self) -> list[torch.Tensor]:
        return [self.queries, *self.self_attn.parameters(), *self.norm_q.parameters()]

    def _current_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._cache_params())

    def clear_cache(self) -> None:
        self.query_cache = None
        self._cache_key = None

    def freeze(self) -> torch.Tensor:
        """Compute the eval cache now (call after loading weights, before export)."""
        with torch.no_grad():
            self.query_cache = self.refined_queries().detach()
        self._cache_key = self._current_key()
        self.cache_computations += 1
        return self.query_cache

    def train(self, mode: bool = True) -> "BoQBlock":
        self.clear_cache()
        return super().train(mode)

    def _queries(self) -> torch.Tensor:
        if self.training:
            return self.refined_queries()
        if _tracing():
            # export: a frozen cache is a constant; otherwise trace the computation itself
            return self.query_cache if self.query_cache is not None else self.refined_queries()
        if self.query_cache is None or self._cache_key != self._current_key():
            self.freeze()
        return self.query_cache

    # -- per image --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        q = self._queries().expand(x.shape[0], -1, -1)
        out, attn = self.cross_attn(q, x, x)
        return x, self.norm_out(out), attn.detach()


class BoQ(nn.Module):
    """[B, C, h, w] feature maps -> [B, proj_channels * row_dim] L2-normalised descriptor."""

    def __init__(
        self,
        in_channels: int = 1024,
        proj_channels: int = 512,
        num_queries: int = 64,
        num_layers: int = 2,
        row_dim: int = 32,
        num_heads: int | None = None,
    ):
        super().__init__()
        heads = num_heads or max(1, proj_channels // 64)
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList([BoQBlock(proj_channels, num_queries, heads) for _ in range(num_layers)])
        self.fc = nn.Linear(num_layers * num_queries, row_dim)
        self.in_channels, self.proj_channels, self.row_dim = in_channels, proj_channels, row_dim

    @classmethod
    def from_preset(cls, preset) -> "BoQ":
        a = preset.aggregator
        if a.kind != "boq":
            raise ConfigError(f"{preset.name} uses {a.kind}, not a BoQ head")
        return cls(preset.backbone.out_channels, a.proj_channels, a.num_queries, a.num_layers, a.row_dim)

    @property
    def out_dim(self) -> int:
        return self.proj_channels * self.row_dim

    def freeze(self) -> "BoQ":
        """eval() and compute every block's query cache, so an exported graph holds them as constants."""
        self.eval()
        for blk in self.boqs:
            blk.freeze()
        return self

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"BoQ expects feature maps [B, {self.in_channels}, h, w], got {tuple(x.shape)}")
        x = self.norm_input(self.proj_c(x).flatten(2).transpose(1, 2))
        outs, attns = [], []
        for blk in self.boqs:
            x, out, attn = blk(x)
            outs.append(out)
            attns.append(attn)
        out = self.fc(torch.cat(outs, dim=1).transpose(1, 2))  # [B, dim, row_dim]
        desc = l2_normalize(out.flatten(1))
        return (desc, attns) if return_attention else desc


def freeze_caches(module: nn.Module) -> nn.Module:
    """Freeze every BoQ head inside `module` (for exporters that get the whole model)."""
    for m in module.modules():
        if isinstance(m, BoQ):
            m.freeze()
    return module


def build_head(preset, *, vocabulary=None, pca=None, state_dict=None, seed: int = 0, origin: str = "the BoQ checkpoint") -> nn.Module:
    """The `boq` head kind (presets.HEADS): the head of a BoQ release checkpoint (its `aggregator.*`
    part, strictly loaded), or seeded random weights without one."""
    from vpr_edge.models import weights as W

    head = BoQ.from_preset(preset)
    if state_dict is None:
        W.init_random_(head, seed)  # seeded per tensor name, like the backbones: a rebuilt reference is equal
        return head
    w = preset.aggregator.weights
    sd = W.subdict(state_dict, "aggregator.")
    expected = {f"aggregator.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    W.check_layout({f"aggregator.{k}": v for k, v in sd.items()}, expected, "boq-head", origin=origin,
                   url=w.url if w else None)
    head.load_state_dict(sd, strict=True)
    return head
