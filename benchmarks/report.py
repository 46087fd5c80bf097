"""What every benchmark script ends with: its Markdown beside its JSON, its plot, the table on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only backend (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(out: Path, md: list[str], plot: Callable[[Path, Any], None], data: Any) -> int:
    """Write out/results.md (complete or not at all), draw plot(out, data), print the table; the exit status."""
    from vpr_edge.atomic import atomic_file

    with atomic_file(out / "results.md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    plot(out, data)
    print("\n".join(md))
    return 0
