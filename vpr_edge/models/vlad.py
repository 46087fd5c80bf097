"""AnyLoc's hard-assignment VLAD as an exportable, trainable nn.Module.

Matches AnyLoc `utilities.VLAD` (vlad_mode='hard', norm_descs=True, intra_norm=True, cosine
k-means): a patch goes to the centre of highest cosine similarity; its residual is the
L2-normalised patch minus the *raw* centre (AnyLoc stores un-normalised k-means means); residuals
are summed per cluster, each cluster block is L2-normalised, blocks are concatenated
cluster-major ([c0 dims, c1 dims, ...]) and the whole vector is L2-normalised. Clusters that no
patch chose stay exactly zero.

Never materialises the [B, N, K, D] residual tensor AnyLoc builds: with the one-hot assignment
A [B, N, K], the per-cluster residual sum is A^T X - counts * C, two matmul-sized ops. The hard
assignment has no gradient; the residual sums do, so a student trains through this head.
"""

from __future__ import annotations

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")
nn = torch.nn

# Floor for the L2 norms. Zero (empty) clusters divide 0 by it and stay 0. It is far below any
# real residual-sum norm, so FP32 results equal AnyLoc's (F.normalize, eps 1e-12); unlike 1e-12
# it is a normal FP16 number, so a graph cast to FP16 keeps a non-zero floor and cannot form 0/0.
NORM_EPS = 1e-4


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = NORM_EPS) -> torch.Tensor:
    """x / max(||x||, eps): exports as ReduceL2 + Max + Div; zero vectors stay zero."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(eps)


class HardVLAD(nn.Module):
    """[B, N, D] patch features -> [B, K*D] VLAD descriptor (K = centers.shape[0])."""

    def __init__(self, centers: torch.Tensor, eps: float = NORM_EPS):
        super().__init__()
        centers = torch.as_tensor(centers, dtype=torch.float32)
        if centers.dim() != 2 or centers.shape[0] < 1:
            raise ConfigError(f"HardVLAD needs centres of shape [K, D], got {tuple(centers.shape)}")
        self.register_buffer("centers", centers.clone())
        self.eps = eps

    @property
    def num_clusters(self) -> int:
        return self.centers.shape[0]

    @property
    def dim(self) -> int:
        return self.centers.shape[1]

    @property
    def out_dim(self) -> int:
        return self.num_clusters * self.dim

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster index per patch [B, N] (ties go to the lowest index, as torch and ONNX ArgMax do)."""
        x = l2_normalize(features, eps=self.eps)
        c = l2_normalize(self.centers, eps=self.eps)
        return torch.argmax(x @ c.transpose(0, 1), dim=-1)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, N] indices -> [B, N, K] float one-hot by comparison with arange (ONNX Equal, no OneHot)."""
        ids = torch.arange(self.num_clusters, device=labels.device)
        return (labels.unsqueeze(-1) == ids).to(self.centers.dtype)

    def residual_sums(self, features: torch.Tensor) -> torch.Tensor:
        """Un-normalised per-cluster residual sums [B, K, D]."""
        if features.dim() != 3 or features.shape[-1] != self.dim:
            raise ConfigError(f"HardVLAD expects features [B, N, {self.dim}], got {tuple(features.shape)}")
        x = l2_normalize(features, eps=self.eps)
        c = l2_normalize(self.centers, eps=self.eps)
        a = self.one_hot(torch.argmax(x @ c.transpose(0, 1), dim=-1))  # [B, N, K]
        counts = a.sum(dim=1).unsqueeze(-1)  # [B, K, 1]
        return a.transpose(1, 2) @ x - counts * self.centers

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        v = l2_normalize(self.residual_sums(features), eps=self.eps)  # intra-normalisation
        return l2_normalize(v.flatten(1), eps=self.eps)

    def extra_repr(self) -> str:
        return f"clusters={self.num_clusters}, dim={self.dim}"


def build_head(preset, *, vocabulary=None, pca=None, state_dict=None, seed: int = 0, origin: str = "") -> nn.Module:
    """The `vlad` head kind (presets.HEADS): hard VLAD with the preset's vocabulary (a `fitted.Vocabulary`)."""
    if vocabulary is None:
        raise ConfigError(
            f"{preset.name} needs a VLAD vocabulary ({preset.aggregator.clusters} centres); fit one with "
            f"`vpr-edge vocab fit IMAGES --model {preset.name} --output vocab.npz` and pass --vocabulary"
        )
    vocabulary.check_for(preset)
    return HardVLAD(torch.from_numpy(vocabulary.centers.copy()))
