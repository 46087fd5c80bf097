"""Every benchmark run writes its own folder: the results plus what is needed to reproduce and
judge them (argv, the exact command, the resolved configuration, package versions, the machine)."""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Any

from vpr_edge.atomic import atomic_file, write_json
from vpr_edge.measure import machine_info
from vpr_edge.manifest import package_versions

SCHEMA = "vpr-edge-bench"
SCHEMA_VERSION = 1
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
COMMAND_TXT = "command.txt"

_PACKAGES = (
    "numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu", "torch", "torchvision",
    "timm", "onnx", "tensorrt", "cuda-python", "matplotlib", "psutil",
)


def command_line(argv: list[str] | None = None) -> str:
    """The shell command that reproduces this run (`vpr-edge ...` when run through the CLI)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("vpr-edge", "main.py", "__main__.py"):
        argv[0] = "vpr-edge"
    return shlex.join(argv)


def command_from_args(args, prog: str = "vpr-edge bench", positionals: tuple[str, ...] = ("target", "artifact"),
                      skip: tuple[str, ...] = ("func", "command", "verbose")) -> str:
    """The canonical command for parsed `args`: positionals, then every option that was given
    (`--dest-with-dashes VALUE`; lists repeat the option; True flags stand alone). It reproduces the
    run however it was started (shell, `main([...])` in a test, a script)."""
    parts = prog.split()
    ns = vars(args)
    parts += [str(ns[k]) for k in positionals if ns.get(k) is not None]
    for key, val in ns.items():
        if key in skip or key in positionals or key.startswith("_") or val is None or val is False:
            continue
        opt = "--" + key.replace("_", "-")
        if val is True or val == "":
            parts.append(opt)
        elif isinstance(val, list):
            for v in val:
                parts += [opt, str(v)]
        elif isinstance(val, tuple):
            parts += [opt, ",".join(str(v) for v in val)]
        else:
            parts += [opt, str(val)]
    return shlex.join(parts)


def jsonable(obj: Any) -> Any:
    """Paths, tuples, numpy scalars -> JSON types (the resolved config holds all three)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run_header(kind: str, config: dict[str, Any], command: str | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """`command`: the command that reproduces the run (default: this process's argv);
    `argv`: this process's argv as it was."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or command_line(argv),
        "argv": list(sys.argv if argv is None else argv),
        "config": jsonable(config),
        "versions": package_versions(*_PACKAGES),
        "machine": machine_info(),
    }


def write_run(folder: Path, results: dict[str, Any], markdown: str) -> None:
    """results.json, results.md and command.txt into `folder` (each written atomically)."""
    folder = Path(folder)
    write_json(folder / RESULTS_JSON, jsonable(results))
    with atomic_file(folder / RESULTS_MD, "w") as fh:
        fh.write(markdown)
    with atomic_file(folder / COMMAND_TXT, "w") as fh:
        fh.write(results.get("command", "") + "\n")
