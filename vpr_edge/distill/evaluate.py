"""Student vs teacher on cached items: descriptor cosine, patch assignment agreement, self-retrieval.

- desc_cos_mean / desc_cos_min: cosine of the student's descriptor (its own hard assignments, the
  inference path) with the teacher's cached descriptor of the same view.
- assign_agree: fraction of patches the student's hard VLAD assignment puts in the teacher's cluster.
- patch_cos: mean cosine of student and teacher patch features.
- top1: asymmetric retrieval among the evaluated items: the fraction of student descriptors whose
  nearest teacher descriptor is that of the same item (student query against a teacher-built map).
- map_top1: top-1 agreement against a teacher-built map of the *other* evaluated items: the fraction of
  items whose student descriptor's nearest teacher descriptor (own item excluded) is the teacher's own
  nearest. What `distill eval` measures against a real map, here on the cached items (a near-duplicate
  neighbour, such as the next frame of a route, makes it hard, as it does there).
"""

from __future__ import annotations

import numpy as np

from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")


def evaluate(student, data, items, *, batch_size: int = 32, device="cpu") -> dict[str, float]:
    """Metrics of `student` (a models.student.Student) on cache items `items` of `data` (RenderedItems)."""
    from vpr_edge.distill.losses import l2

    items = [int(i) for i in items]
    if not items:
        return {}
    was_training = student.training
    student.eval()
    pool = getattr(student.aggregator, "pool", student.aggregator)
    has_assign = hasattr(pool, "assign")
    ds, dt, agree, pcos, tokens = [], [], 0.0, 0.0, 0
    with torch.no_grad():
        for k in range(0, len(items), batch_size):
            batch = [data[i] for i in items[k : k + batch_size]]
            x = torch.stack([b["images"] for b in batch]).to(device)
            f = student.features(x).float()
            d = student.aggregator(f)
            tf = l2(torch.stack([b["features"] for b in batch]).to(device).float())
            ds.append(l2(d).cpu())
            dt.append(l2(torch.stack([b["descriptors"] for b in batch]).float()))
            pcos += float((f * tf).sum(-1).sum())
            tokens += f.shape[0] * f.shape[1]
            if has_assign and "assign" in batch[0]:
                ta = torch.stack([b["assign"] for b in batch]).to(device)
                agree += float((pool.assign(f) == ta).float().sum())
    student.train(was_training)
    ds_, dt_ = torch.cat(ds), torch.cat(dt)
    cos = (ds_ * dt_).sum(-1).numpy()
    sim = ds_ @ dt_.T
    top1 = sim.argmax(dim=1).numpy() == np.arange(len(items))
    own = torch.eye(len(items), dtype=torch.bool)
    map_top1 = (sim.masked_fill(own, -2).argmax(1) == (dt_ @ dt_.T).masked_fill(own, -2).argmax(1)).float()
    out = {
        "items": float(len(items)),
        "desc_cos_mean": float(cos.mean()),
        "desc_cos_min": float(cos.min()),
        "patch_cos": pcos / tokens,
        "top1": float(top1.mean()),
        "map_top1": float(map_top1.mean()) if len(items) > 1 else float("nan"),
    }
    if has_assign:
        out["assign_agree"] = agree / tokens
    return out
