"""Distil a student from a teacher cache: `train(config, cache_path, run_dir, resume=...)`.

Plain torch DistributedDataParallel: the same function runs in one process or under
`torchrun --nproc-per-node N -m vpr_edge.cli.main distill train ...` (gloo on CPU, NCCL on CUDA). The
global batch is `config.batch_size` items whatever the world size: each rank takes its share of
every step's micro-batches (distill.data), gradients are averaged by DDP, so 1 and N processes
follow the same loss curve. Rank 0 writes everything.

Run folder:
    config.json     format header, the TrainConfig, the resolved student, the cache (path,
                    fingerprint, teacher space/identity), the split, argv, versions
    metrics.csv     one row per step: lr, total and per-loss values, gradient norm, items/s
    eval.csv        held-out (and training-subset) metrics every eval_every steps
    curves.png      losses and evaluation curves
    checkpoints/step-NNNNNNN.pt  the last keep_checkpoints checkpoints (distill.checkpoint)
    student.pt      the distilled model: EMA weights of the whole Student (state dict)
    student.json    what student.pt is: student config, head, teacher space/identity, preprocessing,
                    cache fingerprint, final evaluation (distill.train.load_student reads both)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.atomic import write_json
from vpr_edge.distill import checkpoint as C
from vpr_edge.distill import data as D
from vpr_edge.distill.cache import TeacherCache, open_cache
from vpr_edge.distill.config import TrainConfig, config_diff
from vpr_edge.distill.evaluate import evaluate
from vpr_edge.distill.losses import distill_losses
from vpr_edge.distill.optim import Ema, WarmupCosine, param_groups
from vpr_edge.distill.records import CURVES, EVAL, METRICS, CsvLog, plot_curves
from vpr_edge.models.student import STUDENT_PT, Student, StudentConfig, build_student, check_grids, names_run
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")

RUN_FORMAT = "vpr-edge-distill-run"
FORMAT_VERSION = 1
CONFIG = "config.json"
EVAL_COLUMNS = ["step", "split", "items", "desc_cos_mean", "desc_cos_min", "assign_agree", "patch_cos", "top1",
                "map_top1"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps completed
    complete: bool  # reached config.steps (student.pt written)
    student: Path | None
    last_eval: dict[str, dict[str, float]]


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _setup_dist(device: str) -> tuple[_Dist, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world > 1 or (dist.is_available() and dist.is_initialized()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        owned = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            owned = True
        d = _Dist(dist.get_rank(), dist.get_world_size(), local, owned)
        dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        return d, dev
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _Dist(), torch.device(device)


def _autocast(amp: str, device) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("vpr-edge", "torch", "numpy", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _spread(items: np.ndarray, limit: int) -> np.ndarray:
    from vpr_edge.datasets import evenly_spaced

    return items[evenly_spaced(len(items), limit)]


def _init_run(student: StudentConfig, cache: TeacherCache, where: str) -> dict[str, Any] | None:
    """For a student that starts from a distillation run: that run's student.pt (sha256) after checking it was
    distilled into this cache's teacher space; None for other weights."""
    if not names_run(student.weights):
        return None
    from vpr_edge.integrity import file_sha256
    from vpr_edge.models.student import check_run_student, read_student_record
    from vpr_edge.space import require_same

    meta_path, record = read_student_record(student.weights)
    check_run_student(student, record, student.weights)
    require_same(record["teacher"]["space"], cache.space, have_name=f"the student of {meta_path.parent}",
                 want_name=f"{where}'s teacher", fix="start from a student distilled from this teacher")
    pt = meta_path.parent / STUDENT_PT
    return {"run": str(meta_path.parent.resolve()), "student_pt_sha256": file_sha256(pt) if pt.exists() else None}


def _run_record(config: TrainConfig, cache: TeacherCache, student: StudentConfig, sp: D.Split,
                init: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "distill-run",
        "config": config.to_dict(),
        "student": student.to_dict(),
        "cache": {"path": str(cache.path.resolve()), "fingerprint": cache.fingerprint, "items": len(cache),
                  "teacher_space": cache.space, "teacher_identity": cache.identity},
        "split": sp.describe(),
        "init": init,  # the run whose student this one started from (fine-tuning), else None
        "argv": list(sys.argv),
        "versions": _versions(),
    }


def _check_run_dir(run_dir: Path, config: TrainConfig, cache: TeacherCache, resume: bool) -> bool:
    """True when there is an earlier run to continue; refuses a changed config or another cache."""
    path = run_dir / CONFIG
    if not path.exists():
        if C.list_checkpoints(run_dir):
            raise ArtifactError(f"{run_dir} holds checkpoints but no {CONFIG}; it is not a run folder of this trainer")
        return False
    if not resume:
        raise ArtifactError(
            f"{run_dir} already holds a distillation run; pass resume=True (--resume) to continue it "
            "or choose another run folder"
        )
    import json

    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not readable JSON ({exc}); choose another run folder") from None
    if old.get("format") != RUN_FORMAT:
        raise ArtifactError(f"{path} is not a distillation run record; choose another run folder")
    diff = config_diff(old.get("config", {}), config.to_dict())
    if diff:
        raise ConfigError(
            f"{run_dir} was started with another config ({', '.join(diff)} differ); resume with the config in "
            f"{path} or start a new run folder"
        )
    if old.get("cache", {}).get("fingerprint") != cache.fingerprint:
        was = old.get("cache", {})
        raise ArtifactError(
            f"{run_dir} was trained on cache {was.get('path')} (plan {str(was.get('fingerprint'))[:12]}), "
            f"not on {cache.path} (plan {cache.fingerprint[:12]}); resume with that cache or start a new run folder"
        )
    return True


def train(
    config: TrainConfig,
    cache_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
    image_root: str | os.PathLike | None = None,
    stop_after: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    verify: str = "sha256",
) -> TrainResult:
    """Train (or continue) the student of `config` on the cache at `cache_path`, writing `run_dir`.

    resume=True continues the newest checkpoint exactly (same weights as an uninterrupted run up to
    float noise; the world size may differ); it starts from scratch when there is none yet.
    stop_after=k stops cleanly after k steps of this call (writing a checkpoint), as a preemption
    would; should_stop() is polled after every step for the same purpose (`vpr-edge distill train` wires SIGTERM).
    verify: how rank 0 checks the cache when opening it ('sha256' reads every shard; 'size' for huge
    caches); the other ranks check sizes.
    """
    run_dir = Path(run_dir)
    dist, dev = _setup_dist(device)
    try:
        return _train(config, Path(cache_path), run_dir, resume, dist, dev, workers, progress, image_root, stop_after,
                      should_stop, verify)
    finally:
        if dist.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(
    config, cache_path, run_dir, resume, dist, dev, workers, progress, image_root, stop_after, should_stop, verify
):
    if config.amp == "fp16" and dev.type != "cuda":
        raise ConfigError(f"{run_dir}: amp 'fp16' needs a CUDA device (it uses a GradScaler); use amp 'bf16' on CPU")
    cache = open_cache(cache_path, verify=verify if dist.main else "size", image_root=image_root)
    where = f"run {run_dir} on cache {cache.path}"
    scfg = config.student.for_teacher(cache.feature_dim, cache.grid, cache.preprocess.image_size, where=where)
    check_grids(scfg, cache.preprocess.image_size, where=where)
    config.losses.check_head(cache.head["kind"], where=where)
    init = _init_run(scfg, cache, where)
    accumulation = config.accumulation(dist.world)
    sp = D.split(cache, config.heldout_fraction)
    if len(sp.train_items) == 0:
        raise ArtifactError(f"{cache.path}: no training items after holding out {len(sp.heldout_images)} images")
    # the ranking loss's bank, checked before the run folder is written
    bank = D.ranking_bank(cache, sp, config.losses.ranking_bank, where=where) if config.losses.ranking else None
    continuing = _check_run_dir(run_dir, config, cache, resume)
    ckpts = C.list_checkpoints(run_dir) if continuing else []
    dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not continuing:
            write_json(run_dir / CONFIG, _run_record(config, cache, scfg, sp, init))

    # -- model, optimiser, schedule, EMA ------------------------------------------------------
    build_cfg = dataclasses.replace(scfg, weights="random") if ckpts else scfg  # a checkpoint overwrites them
    if dist.main:
        student = build_student(build_cfg, cache.head_module())
    dist.barrier()  # rank 0 fetches 'auto' weights first; the others then find them in the hub cache
    if not dist.main:
        student = build_student(build_cfg, cache.head_module())
    student = student.to(dev).train()
    student.aggregator.eval()
    opt = torch.optim.AdamW(
        param_groups(student.backbone, config.lr, config.backbone_lr_scale, config.weight_decay),
        lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio))
    scaler = torch.amp.GradScaler(dev.type, enabled=config.amp == "fp16")
    ema = Ema(student, config.ema_decay) if config.ema_decay > 0 else None
    start = 0
    if ckpts:
        ck = C.load(ckpts[-1][1], device=dev)
        if ck.get("cache") != cache.fingerprint:
            raise ArtifactError(f"{ckpts[-1][1]} was written for another teacher cache; start a new run folder")
        student.backbone.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        C.set_rng_state(ck["rng"])
        start = int(ck["step"])
        student.train()
        student.aggregator.eval()

    active = list(config.losses.active)
    columns = ["step", "epoch", "lr", "loss"] + [f"loss_{n}" for n in active] + ["grad_norm", "items_per_s", "wall_s"]
    metrics = CsvLog(run_dir / METRICS, columns)
    evals = CsvLog(run_dir / EVAL, EVAL_COLUMNS)
    if dist.main:
        metrics.truncate_after(start)
        evals.truncate_after(start)

    ddp = None
    train_backbone = student.backbone
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            student.backbone, device_ids=[dev.index] if dev.type == "cuda" else None
        )
        train_backbone = ddp

    data = D.RenderedItems(cache, scfg.image_size)
    eval_sets = {"heldout": _spread(sp.heldout_items, config.eval_limit),
                 "train": _spread(D.plain_train_items(cache, sp), config.eval_limit)}
    last_eval: dict[str, dict[str, float]] = {}

    def run_eval(step: int) -> None:
        model = ema.module if ema is not None else student
        for name, items in eval_sets.items():
            if len(items) == 0:
                continue
            m = evaluate(model, data, items, batch_size=max(config.micro_batch_size, 8), device=dev)
            last_eval[name] = m
            evals.append({"step": step, "split": name} | m)
        plot_curves(metrics.rows(), evals.rows(), run_dir / CURVES, active)

    def save_checkpoint(step: int) -> None:
        C.save(run_dir, step, {
            "data_position": step * config.batch_size,
            "config": config.to_dict(),
            "cache": cache.fingerprint,
            "world_size": dist.world,
            "model": student.backbone.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": C.rng_state(),
        }, keep=config.keep_checkpoints)

    # -- loop ---------------------------------------------------------------------------------
    end = config.steps if stop_after is None else min(config.steps, start + int(stop_after))
    batches = D.rank_micro_batches(sp.train_items, start, end, config.batch_size, config.micro_batch_size,
                                   config.seed, dist.rank, dist.world)
    it = iter(D.loader(data, batches, workers))
    params = [p for p in student.backbone.parameters() if p.requires_grad]
    head = student.aggregator
    n_train = len(sp.train_items)
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="distill", unit="step", disable=not (progress and dist.main))
    step = start
    t_run = time.perf_counter()
    try:
        while step < end:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            # on the device (NCCL reduces CUDA tensors); the last entry carries this rank's stop request
            acc = torch.zeros(2 + len(active), dtype=torch.float64, device=dev)
            lr = max(g["lr"] for g in opt.param_groups)
            for a in range(accumulation):
                batch = next(it)
                sync = ddp is None or a == accumulation - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with _autocast(config.amp, dev):
                        feats = train_backbone(batch["images"].to(dev, non_blocking=True))
                    assign = batch.get("assign")
                    total, parts = distill_losses(
                        config.losses, head, feats.float(), batch["features"].to(dev), batch["descriptors"].to(dev),
                        assign.to(dev) if assign is not None else None,
                        bank=bank, images=batch["image"] if bank is not None else None,
                    )
                    scaler.scale(total / accumulation).backward()
                acc[: 1 + len(active)] += torch.stack([total.detach()] + [parts[n].detach() for n in active]).double()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(student)
            step += 1
            acc[-1] = float(should_stop is not None and should_stop())
            if dist.world > 1:
                torch.distributed.all_reduce(acc)  # losses summed; a stop asked on any rank stops all
            stop_requested = bool(acc[-1] > 0)
            acc = (acc[:-1] / (accumulation * dist.world)).cpu()
            if dist.main:
                dt = time.perf_counter() - t0
                row = {"step": step, "epoch": step * config.batch_size / n_train, "lr": lr, "loss": float(acc[0])}
                row |= {f"loss_{n}": float(acc[1 + i]) for i, n in enumerate(active)}
                row |= {"grad_norm": float(gnorm), "items_per_s": config.batch_size / dt, "wall_s": time.perf_counter() - t_run}
                metrics.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            stopping = step < config.steps and (step == end or stop_requested)
            if dist.main:
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    run_eval(step)
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps or stopping:
                    save_checkpoint(step)
            if stopping:
                break
    finally:
        bar.close()
    dist.barrier()
    if step < config.steps:
        return TrainResult(run_dir, step, False, None, last_eval)
    path = run_dir / STUDENT_PT  # written by models.student.save_student
    if dist.main:
        if not last_eval:  # resumed a finished run: evaluate again for the record
            run_eval(step)
        _write_student(run_dir, ema.module if ema is not None else student, scfg, cache, config, step, last_eval)
    dist.barrier()
    return TrainResult(run_dir, step, True, path, last_eval)


def _write_student(run_dir: Path, model: Student, scfg: StudentConfig, cache: TeacherCache, config: TrainConfig,
                   step: int, last_eval: dict) -> None:
    from vpr_edge.models.student import save_student

    save_student(run_dir, model, scfg, cache.head, dataclasses.replace(cache.preprocess, image_size=tuple(scfg.image_size)),
                 teacher={"space": cache.space, "identity": cache.identity, "grid": list(cache.grid),
                          "feature_dim": cache.feature_dim, "descriptor_dim": cache.descriptor_dim},
                 extra={"weights": "ema" if config.ema_decay > 0 else "final",
                        "cache": {"path": str(cache.path.resolve()), "fingerprint": cache.fingerprint},
                        "steps": step, "eval": last_eval, "versions": _versions()})


def load_student(path: str | os.PathLike, device: str = "cpu") -> Student:
    """The distilled student of a run folder (`models.student.load_student`)."""
    from vpr_edge.models.student import load_student as load

    return load(path, device)
