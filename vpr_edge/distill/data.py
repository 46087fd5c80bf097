"""Training data from a teacher cache: the held-out split, the deterministic order, the rendered inputs.

Split: the last ceil(heldout_fraction x images) images of the cache (in its image order: for a
route such as Nordland, a stretch of the route never trained on) are held out, all their views;
evaluation uses their view 0, the plain image. The rest are training images, all views.

Order: the training items form one stream, epoch e being the permutation of the training items
drawn by numpy's PCG64 from (seed, e). Optimizer step s consumes stream positions [s*B, (s+1)*B)
(B the global batch), so the data position is s*B and resuming at any step needs no iterator
state. Step s's items are cut into micro-batches of `micro_batch_size`; with W processes rank r
takes micro-batches r, r+W, ... Every micro-batch holds the same items whatever W, so a run on 1
or N processes at the same global batch computes the same losses (up to float summation order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from vpr_edge.distill import views as V
from vpr_edge.distill.cache import TeacherCache
from vpr_edge.errors import InputError
from vpr_edge.lazy import lazy_import
from vpr_edge.presets import Preprocess

torch = lazy_import("torch")


@dataclass(frozen=True)
class Split:
    train_images: np.ndarray
    heldout_images: np.ndarray
    train_items: np.ndarray  # all views of training images
    heldout_items: np.ndarray  # view 0 of held-out images

    def describe(self) -> dict:
        return {
            "rule": "last ceil(heldout_fraction x images) images of the cache order are held out; eval uses their view 0",
            "train_images": int(len(self.train_images)),
            "train_items": int(len(self.train_items)),
            "heldout_images": int(len(self.heldout_images)),
            "heldout_first_image": int(self.heldout_images[0]) if len(self.heldout_images) else None,
        }


def split(cache: TeacherCache, heldout_fraction: float) -> Split:
    images = np.unique(cache.items[:, 0])  # readable images, cache order
    n_held = math.ceil(heldout_fraction * len(images)) if heldout_fraction > 0 else 0
    if n_held >= len(images):
        raise InputError(
            f"{cache.path}: {len(images)} images cannot hold out {n_held} (heldout_fraction {heldout_fraction}); "
            "use more images or a smaller heldout_fraction"
        )
    train_images, held = images[: len(images) - n_held], images[len(images) - n_held :]
    held_items = np.flatnonzero((cache.items[:, 1] == 0) & np.isin(cache.items[:, 0], held))
    return Split(train_images, held, cache.items_of_images(train_images), held_items)


def plain_train_items(cache: TeacherCache, sp: Split) -> np.ndarray:
    """View 0 of every training image (the training-set evaluation)."""
    return np.flatnonzero((cache.items[:, 1] == 0) & np.isin(cache.items[:, 0], sp.train_images))


def ranking_bank(cache: TeacherCache, sp: Split, limit: int, where: str = ""):
    """The ranking loss's map of the training set: the teacher's descriptor of view 0 of up to `limit`
    training images (evenly spaced in cache order), L2-normalised, with their image indices. It needs 3
    images at least: each item ranks 2 or more neighbours besides its own image."""
    from vpr_edge.datasets import evenly_spaced
    from vpr_edge.distill.losses import RankingBank, l2

    items = plain_train_items(cache, sp)
    items = items[evenly_spaced(len(items), limit)]
    if len(items) < 3:
        raise InputError(f"{where or cache.path}: the ranking loss needs 3 training images or more, the cache holds "
                         f"{len(items)} after the held-out split; add images or set losses.ranking = 0")
    d = np.stack([np.asarray(cache[int(i)]["descriptor"], dtype=np.float32) for i in items])
    return RankingBank(l2(torch.from_numpy(d)), torch.from_numpy(cache.items[items, 0].astype(np.int64)))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))).permutation(n)


def step_items(train_items: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The global batch of optimizer step `step` (0-based): stream positions [step*B, (step+1)*B)."""
    n = len(train_items)
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, within = pos // n, pos % n
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = train_items[epoch_order(n, seed, int(e))[within[sel]]]
    return out


def rank_micro_batches(
    train_items: np.ndarray, start: int, steps: int, batch_size: int, micro: int, seed: int, rank: int, world: int
) -> Iterator[list[int]]:
    """This rank's micro-batches for steps start..steps-1, in order."""
    for s in range(start, steps):
        items = step_items(train_items, s, batch_size, seed)
        for j in range(rank, batch_size // micro, world):
            yield items[j * micro : (j + 1) * micro].tolist()


class RenderedItems(torch.utils.data.Dataset):
    """Item i of the cache -> the student's input for the view the teacher saw, plus the teacher's outputs."""

    def __init__(self, cache: TeacherCache, image_size: tuple[int, int]) -> None:
        self.cache = cache
        # the product's preprocessing of the teacher, at the student's input size
        self.preprocess: Preprocess = replace(cache.preprocess, image_size=tuple(image_size))

    def __len__(self) -> int:
        return len(self.cache)

    def image(self, i: int) -> np.ndarray:
        from vpr_edge.imaging.decode import load_rgb
        from vpr_edge.imaging.exact import preprocess_rgb

        v = self.cache.view(i)
        path = self.cache.image_path(v.image)
        return preprocess_rgb(V.render(load_rgb(path), v, str(path)), self.preprocess)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        item = self.cache[i]
        out = {
            "index": i,
            "image": int(self.cache.items[i, 0]),  # the cache image the view is of
            "images": torch.from_numpy(self.image(i)),
            "features": torch.from_numpy(np.asarray(item["features"], dtype=np.float16).copy()),
            "descriptors": torch.from_numpy(np.asarray(item["descriptor"], dtype=np.float32).copy()),
        }
        if item["assign"] is not None:
            out["assign"] = torch.from_numpy(np.asarray(item["assign"]).astype(np.int64))
        return out


def loader(data: RenderedItems, batches, workers: int = 0):
    """A DataLoader over explicit micro-batches (the order is ours, not a sampler's)."""
    return torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=workers,
                                       persistent_workers=False, pin_memory=False)
