"""AdamW parameter groups, the warm-up + cosine schedule, and the EMA of the student weights."""

from __future__ import annotations

import math

from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")

_NO_DECAY = ("pos_embed", "cls_token", "register_tokens", "mask_token")


def param_groups(backbone, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
    """ViT parameters at lr * backbone_lr_scale, the rest (head norm, projection) at lr; no weight decay
    on biases, norm weights, LayerScale gammas, position embedding and tokens."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        vit = name.startswith("vit.")
        decay = p.ndim >= 2 and not any(t in name for t in _NO_DECAY)
        groups.setdefault((vit, decay), []).append(p)
    out = []
    for (vit, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": lr * (backbone_lr_scale if vit else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'vit' if vit else 'head'}{'' if decay else '-no-decay'}",
        })
    return out


class WarmupCosine:
    """lr factor at step s: linear warm-up to 1 over `warmup` steps, then cosine to `floor` at `total`.

    A callable object (not a lambda) so LambdaLR's state dict stays plain numbers."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        span = max(1, self.total - self.warmup - 1)
        t = min(1.0, (s - self.warmup) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return {"warmup": self.warmup, "total": self.total, "floor": self.floor}


class Ema:
    """Exponential moving average of a module's floating parameters (buffers copied).

    decay at update u (1-based): min(decay, (1 + u) / (10 + u)), so early weights (random init) fade
    quickly in short runs; DINOv2 keeps its EMA teacher as the final model, we keep this one."""

    def __init__(self, module, decay: float) -> None:
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        live = dict(module.named_buffers())
        for name, e in self.module.named_buffers():
            if name in live and live[name].shape == e.shape:
                e.copy_(live[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.updates = int(sd["updates"])
        self.module.load_state_dict(sd["module"])
