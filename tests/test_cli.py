"""The CLI: every module imports, every --help works without torch/tensorrt, missing extras are named."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import vpr_edge
from vpr_edge.cli.main import COMMANDS, main

_BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm", "tensorrt", "onnxscript", "pycuda"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    """
)


def _no_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(vpr_edge.__path__, "vpr_edge.")]
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)


def test_every_help_without_torch_or_tensorrt():
    r = _no_torch(
        """
        import contextlib, io
        from vpr_edge.cli.main import build_parser, COMMANDS
        p = build_parser()
        for c in COMMANDS:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    p.parse_args([c, "--help"])
            except SystemExit as e:
                assert e.code == 0, c
            print("ok", c)
        assert "torch" not in sys.modules
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == len(COMMANDS)


def test_presets_without_torch_and_missing_torch_names_the_extra(tmp_path):
    r = _no_torch(
        f"""
        from vpr_edge.cli.main import main
        assert main(["presets"]) == 0
        code = main(["describe", {str(tmp_path)!r}, "--model", "anyloc-dinov2@tiny", "--weights", "random"])
        print("exit", code)
        """
    )
    assert "anyloc-dinov2" in r.stdout and "exit 2" in r.stdout, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("vpr-edge: error")]
    assert len(err) == 1 and "pip install 'vpr-edge[torch]'" in err[0]


def test_presets_lists_every_preset_with_sizes(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, dim in [("anyloc-dinov2", "49152"), ("anyloc-dinov2-pca", "512"), ("anyloc-dinov2-gem", "1536"),
                      ("anyloc-dino", "49152"), ("boq-resnet50", "16384"), ("boq-dinov2", "12288")]:
        line = next(l for l in out.splitlines() if l.split()[0] == name)
        assert dim in line.split()
    assert "dinov2_vitg14_pretrain.pth" in out and "resnet50_16384.pth" in out


def test_unknown_command_and_bad_image_size(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--model", "anyloc-dinov2", "--image-size", "abc"])
    assert "image size" in capsys.readouterr().err
