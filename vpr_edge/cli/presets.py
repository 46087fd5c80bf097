"""`vpr-edge presets`: the registry as a table (or JSON)."""

from __future__ import annotations

import json

from vpr_edge import presets


def register(sub) -> None:
    p = sub.add_parser("presets", help="list presets with descriptor size, input, backbone, layer, facet, weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tiny", action="store_true", help="show the toy-size configurations used by the tests")
    p.set_defaults(func=_run)


def _run(args) -> int:
    rows = [(presets.get(n).tiny() if args.tiny else presets.get(n)).describe() for n in presets.names()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "dim", "input", "backbone", "layer", "facet", "aggregator", "weights"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0
