"""The runtime works where torch (and tensorrt) cannot be imported: checked in a subprocess whose
import system refuses them, running a real ORT artifact and the map CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vpr_edge import presets

pytest.importorskip("onnx", reason="onnx not installed (export extra), needed to write the toy artifact")

CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    BLOCKED = ("torch", "torchvision", "timm", "tensorrt")

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    art, images, map_dir = sys.argv[1], sys.argv[2], sys.argv[3]

    import vpr_edge.runtime as R
    mods = sorted(m.name for m in pkgutil.iter_modules(R.__path__))
    for m in mods:
        importlib.import_module("vpr_edge.runtime." + m)
    import vpr_edge.datasets

    files = vpr_edge.datasets.list_images(images)[:4]
    with R.Describer.from_artifact(art, threads=1) as d:
        desc = d.describe(files, batch=3)

    import argparse
    from vpr_edge.cli import map as map_cli
    parser = argparse.ArgumentParser()
    map_cli.register(parser.add_subparsers())
    for argv in (["map", "build", images, "--model", art, "-o", map_dir, "--threads", "1", "--chunk", "50"],
                 ["map", "query", map_dir, str(files[0]), "--top-k", "2", "--json", "--threads", "1"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    print(json.dumps({"modules": mods, "shape": list(desc.shape),
                      "torch": [m for m in sys.modules if m.split(".")[0] in BLOCKED],
                      "models": [m for m in sys.modules if m.startswith("vpr_edge.models")]}))
    """
)


def test_runtime_runs_without_torch(corridor, tmp_path):
    from toy_artifact import write_toy_artifact

    preset = presets.get("anyloc-dinov2").tiny()
    art = write_toy_artifact(tmp_path / "art", preset, "backbone")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(art), str(corridor / "database"), str(tmp_path / "map")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"modules"' in line]
    report = json.loads(lines[-1])
    assert report["torch"] == [] and report["models"] == []
    assert report["shape"] == [4, preset.descriptor_dim]
    assert {"describer", "backends", "aggregate", "maps", "trt_backend", "ort_backend"} <= set(
        report["modules"]
    )
    assert '"rank": 1' in proc.stdout
