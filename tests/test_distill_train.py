"""The trainer: it learns, it resumes exactly, 2 processes follow 1, bad runs are refused."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_edge.distill import checkpoint as C
from vpr_edge.distill.cache import build_cache, open_cache
from vpr_edge.distill.config import TrainConfig
from vpr_edge.distill.data import RenderedItems
from vpr_edge.distill.evaluate import evaluate
from vpr_edge.models.student import StudentConfig
from vpr_edge.distill.toy import toy_teacher
from vpr_edge.distill.train import load_student, train
from vpr_edge.cli.main import main as cli_main
from vpr_edge.errors import ArtifactError, ConfigError

REPO = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ["loss", "loss_patch", "loss_vlad", "loss_descriptor", "loss_relational"]  # the default losses


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def teacher(imgs):
    return toy_teacher(imgs)


@pytest.fixture(scope="module")
def cache6(tmp_path_factory, imgs, teacher):
    out = tmp_path_factory.mktemp("train") / "cache6"
    build_cache(imgs, teacher, out, views=2, shard_size=4, progress=False)
    return out


def _tiny(**kw) -> TrainConfig:
    base = dict(
        student=StudentConfig(tiny=True), steps=8, batch_size=4, micro_batch_size=2, lr=2e-3, warmup_steps=2,
        eval_every=0, checkpoint_every=0, heldout_fraction=0.2, ema_decay=0.9,
    )
    return TrainConfig(**(base | kw))


def _metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _losses(run: Path) -> np.ndarray:
    return np.array([[float(r[c]) for c in LOSS_COLUMNS] for r in _metrics(run)])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path, atol: float, key_bias_free: bool = False) -> None:
    """Equal weights. key_bias_free: skip the key third of each qkv bias. Attention is invariant to it
    (softmax of q.(k + b) shifts every logit of a row by q.b), so its gradient is 0 up to float noise,
    which Adam divides by its own RMS into lr-sized steps: other summation orders (2 ranks) move it
    differently without changing any output."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k], wb[k]
        if key_bias_free and k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=k)


def test_loss_decreases_and_the_run_folder_is_complete(tmp_path, cache6):
    # ViT-S/14 student at another input size: its 6x8 tokens are aligned to the teacher's 8x11
    cfg = _tiny(student=StudentConfig(tiny=True, image_size=(84, 112)), steps=30, batch_size=8, micro_batch_size=4,
                warmup_steps=3, eval_every=15, checkpoint_every=10, keep_checkpoints=2)
    run = tmp_path / "run"
    res = train(cfg, cache6, run, progress=False)
    assert res.complete and res.step == 30
    loss = _losses(run)
    assert loss.shape == (30, len(LOSS_COLUMNS)) and np.isfinite(loss).all()
    assert loss[-3:, 0].mean() < 0.75 * loss[:3, 0].mean(), loss[:, 0]
    assert loss[-3:, 1].mean() < loss[:3, 1].mean()  # the patch loss itself
    rec = json.loads((run / "config.json").read_text())
    assert rec["kind"] == "distill-run" and rec["student"]["teacher_grid"] == [8, 11]
    assert rec["split"]["heldout_images"] == 2 and rec["split"]["train_items"] == 8
    with (run / "eval.csv").open() as fh:
        ev = list(csv.DictReader(fh))
    assert [(r["step"], r["split"]) for r in ev] == [("15", "heldout"), ("15", "train"), ("30", "heldout"), ("30", "train")]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in C.list_checkpoints(run)] == [20, 30]
    meta = json.loads((run / "student.json").read_text())
    assert meta["kind"] == "distilled-student" and meta["weights"] == "ema" and meta["preprocess"]["image_size"] == [84, 112]
    student = load_student(run)
    cache = open_cache(cache6)
    data = RenderedItems(cache, (84, 112))
    held = [i for i in range(len(cache)) if cache.items[i, 1] == 0 and cache.items[i, 0] >= 4]
    again = evaluate(student, data, held)
    for k, v in res.last_eval["heldout"].items():
        assert abs(again[k] - v) < 1e-5, k


def test_a_student_of_the_teachers_architecture_reaches_it(tmp_path, imgs, teacher):
    # ViT-G/14-shaped tiny student, tokens of block 1 = the teacher's trunk before its block-2 value facet
    cache = build_cache(imgs[:3], teacher, tmp_path / "c3", views=2, progress=False)
    # with the assignment loss (off by default): an exact replica's last descriptor error is tokens in the wrong
    # cluster, which that loss pins (on this CPU: cos 0.997 after 160 steps; without it 0.983, and 0.993 after 320)
    cfg = TrainConfig(
        student=StudentConfig(arch="vitg14", tiny=True, block=1), steps=160, batch_size=6, micro_batch_size=6,
        lr=3e-2, backbone_lr_scale=0.1, weight_decay=0.0, warmup_steps=5, min_lr_ratio=0.1,
        heldout_fraction=0.0, ema_decay=0.0, eval_every=0, checkpoint_every=0, losses={"assignment": 0.1},
    )
    train(cfg, tmp_path / "c3", tmp_path / "run", progress=False)
    student = load_student(tmp_path / "run")
    m = evaluate(student, RenderedItems(cache, (112, 154)), range(len(cache)))  # every view trained on
    assert m["desc_cos_mean"] > 0.99, m
    assert m["top1"] == 1.0


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, cache6):
    cfg = _tiny(steps=30, checkpoint_every=3)
    full = tmp_path / "full"
    train(cfg, cache6, full, progress=False)
    # a preempted run: SIGTERM to `vpr-edge distill train` stops it after the current step, with a checkpoint
    part = tmp_path / "part"
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vpr_edge.cli.main", "distill", "train", "--config", str(tmp_path / "run.json"),
           "--cache", str(cache6), "--output", str(part), "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((part / "metrics.csv").exists() and len(_metrics(part)) >= 4):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        proc.kill()
    stopped = C.list_checkpoints(part)[-1][0]
    assert 4 <= stopped < 30 and not (part / "student.pt").exists()
    # and then a kill before its checkpoint: the previous checkpoint and more metric rows remain
    C.path_for(part, stopped).unlink()
    assert len(_metrics(part)) == stopped > C.list_checkpoints(part)[-1][0]
    res = train(cfg, cache6, part, progress=False, resume=True)
    assert res.complete and res.step == 30
    np.testing.assert_allclose(_losses(part), _losses(full), rtol=1e-6, atol=1e-7)
    _assert_same_weights(part, full, atol=1e-6)
    ck = C.load(C.path_for(part, 30))
    assert ck["data_position"] == 30 * cfg.batch_size and {"python", "numpy", "torch"} <= ck["rng"].keys()
    assert {"model", "optimizer", "scheduler", "scaler", "ema"} <= ck.keys()
    # stop_after: the same clean stop from Python
    res = train(dataclasses.replace(cfg, steps=8), cache6, tmp_path / "short", progress=False, stop_after=5)
    assert not res.complete and res.step == 5 and C.list_checkpoints(tmp_path / "short")[-1][0] == 5
    # refusals of a resume
    with pytest.raises(ConfigError, match=rf"{part} was started with another config \(lr differ\)"):
        train(dataclasses.replace(cfg, lr=1e-3), cache6, part, progress=False, resume=True)
    with pytest.raises(ArtifactError, match=rf"{part} already holds a distillation run; pass resume=True"):
        train(cfg, cache6, part, progress=False)


def test_bad_runs_are_refused_before_anything_is_written(tmp_path, cache6):
    run = tmp_path / "run"
    off = _tiny(student=StudentConfig(tiny=True, image_size=(84, 112), align="none"))
    with pytest.raises(ConfigError, match=rf"run {run} on cache {cache6}: student grid 6x8 .* differs from the teacher grid 8x11"):
        train(off, cache6, run, progress=False)
    with pytest.raises(ConfigError, match="amp 'fp16' needs a CUDA device"):
        train(_tiny(amp="fp16"), cache6, run, progress=False, device="cpu")
    with pytest.raises(ConfigError, match="micro_batch_size x 3"):
        _tiny(batch_size=4, micro_batch_size=2).accumulation(3)
    assert not run.exists()
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps(_tiny().to_dict() | {"learning_rate": 1}))
    assert cli_main(["distill", "train", "--config", str(bad), "--cache", str(cache6), "--output", str(run), "--quiet"]) == 2
    with pytest.raises(ConfigError, match=rf"{bad}: unknown fields \['learning_rate'\]"):
        TrainConfig.load(bad)


def test_a_student_starts_from_another_runs_student(tmp_path, cache6):
    # fine-tuning (a map-specific student from a generic one): the new run starts at the old run's student
    base = _tiny(steps=12)
    first = tmp_path / "generic"
    train(base, cache6, first, progress=False)
    cfg = _tiny(steps=3, student=StudentConfig(tiny=True, weights=str(first)))
    from vpr_edge.distill.cache import open_cache as oc
    from vpr_edge.models.student import build_student

    c = oc(cache6)
    resolved = cfg.student.for_teacher(c.feature_dim, c.grid, c.preprocess.image_size)
    start = build_student(resolved, c.head_module()).backbone.state_dict()
    trained = load_student(first).backbone.state_dict()
    assert start.keys() == trained.keys()
    for k in start:
        torch.testing.assert_close(start[k], trained[k], atol=0, rtol=0, msg=k)
    tuned = tmp_path / "tuned"
    train(cfg, cache6, tuned, progress=False)
    rec = json.loads((tuned / "config.json").read_text())
    from vpr_edge.integrity import file_sha256

    assert rec["init"] == {"run": str(first.resolve()), "student_pt_sha256": file_sha256(first / "student.pt")}
    assert json.loads((first / "config.json").read_text())["init"] is None
    # it continues where the first run ended, far below a fresh student's first loss
    assert _losses(tuned)[0, 0] < 0.8 * _losses(first)[0, 0]
    # refusals, one line each, nothing written: another input size, another teacher's student, not a run
    with pytest.raises(ConfigError, match=rf"{first}: its student differs from the one asked for \(image_size"):
        train(_tiny(student=StudentConfig(tiny=True, weights=str(first), image_size=(84, 112))), cache6,
              tmp_path / "x1", progress=False)
    other = tmp_path / "other-teacher"
    other.mkdir()
    for f in ("student.pt", "student.json"):
        (other / f).write_bytes((first / f).read_bytes())
    meta = json.loads((other / "student.json").read_text())
    meta["teacher"]["space"]["weights"] = "random:seed=9"
    (other / "student.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"the student of .*other-teacher and run .*'s teacher are in different "
                                            r"descriptor spaces \(weights random:seed=9 vs random:seed=0\)"):
        train(_tiny(student=StudentConfig(tiny=True, weights=str(other))), cache6, tmp_path / "x2", progress=False)
    with pytest.raises(ArtifactError, match=rf"{tmp_path}/student.json not found"):
        train(_tiny(student=StudentConfig(tiny=True, weights=str(tmp_path))), cache6, tmp_path / "x3", progress=False)
    assert not any((tmp_path / n).exists() for n in ("x1", "x2", "x3"))


def test_bf16_autocast_trains(tmp_path, cache6):
    res = train(_tiny(steps=2, amp="bf16"), cache6, tmp_path / "run", progress=False)
    assert res.complete and np.isfinite(_losses(tmp_path / "run")).all()


def test_two_processes_follow_one_at_the_same_global_batch(tmp_path, cache6):
    # 4 micro-batches per step: one process accumulates 4, each of two ranks accumulates 2
    cfg = _tiny(steps=4, batch_size=8, micro_batch_size=2, checkpoint_every=2)
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vpr_edge.cli.main", "distill", "train", "--config", str(tmp_path / "run.json"), "--cache", str(cache6),
           "--output", str(tmp_path / "ddp"), "--device", "cpu", "--threads", "1", "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    train(cfg, cache6, tmp_path / "one", progress=False, device="cpu")
    np.testing.assert_allclose(_losses(tmp_path / "ddp"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    _assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-5, key_bias_free=True)
    x = torch.stack([torch.from_numpy(RenderedItems(open_cache(cache6), (112, 154)).image(i)) for i in (0, 5)])
    with torch.no_grad():
        torch.testing.assert_close(load_student(tmp_path / "ddp")(x), load_student(tmp_path / "one")(x), atol=1e-5, rtol=0)
    assert C.load(C.path_for(tmp_path / "ddp", 4))["world_size"] == 2


def test_the_ranking_loss_trains_against_a_bank_of_other_training_images(tmp_path, cache6):
    from vpr_edge.distill.data import ranking_bank, split

    cache = open_cache(cache6)
    sp = split(cache, 0.2)
    bank = ranking_bank(cache, sp, 3)
    assert len(bank.images) == 3 and set(bank.images.tolist()) <= set(sp.train_images.tolist())
    torch.testing.assert_close(bank.descriptors.norm(dim=1), torch.ones(3))
    losses = {"patch": 1.0, "vlad": 1.0, "descriptor": 1.0, "relational": 0.1, "assignment": 0.1, "ranking": 1.0}
    res = train(_tiny(steps=6, losses=losses), cache6, tmp_path / "run", progress=False)
    rows = _metrics(tmp_path / "run")
    assert res.complete and all(np.isfinite(float(r["loss_ranking"])) for r in rows)
    with (tmp_path / "run" / "eval.csv").open() as fh:
        ev = list(csv.DictReader(fh))
    assert ev and all(0.0 <= float(r["map_top1"]) <= 1.0 for r in ev)


def test_a_ranking_bank_too_small_is_refused_before_the_run_folder_is_written(tmp_path, cache6):
    from vpr_edge.errors import InputError

    losses = {"patch": 1.0, "ranking": 1.0}
    with pytest.raises(InputError, match=r"cache6.*ranking loss needs 3 training images or more.*holds 2"):
        train(_tiny(steps=2, losses=losses, heldout_fraction=0.6), cache6, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
