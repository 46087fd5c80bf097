"""Reading `.npy` files that hold Python objects without running code (VPR-Bench's ground truth).

`np.load(allow_pickle=True)` unpickles whatever the file says, and a pickle can call any function: an
object array in a downloaded `ground_truth_new.npy` would run arbitrary code. Here an object array is
read by an unpickler that admits only what numpy itself writes for arrays of numbers and lists (array
and dtype reconstruction, numpy scalars; Python lists, tuples, ints, floats and strings need no
globals); any other global is refused with one line, before it is ever called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from vpr_edge.errors import InputError

# (module, name) pairs numpy's pickles of numeric arrays reference, in numpy 1.x and 2.x spellings
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _Restricted(pickle.Unpickler):
    def __init__(self, fh, source: Path):
        super().__init__(fh)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise InputError(
                f"{self.source}: refused: the file asks to run {module}.{name} while loading, which a data file "
                "never needs (it could run arbitrary code); delete it and get the ground truth from a source you trust"
            )
        return super().find_class(module, name)


def load_npy(path: str | Path) -> np.ndarray:
    """A `.npy` array; object arrays through the restricted unpickler (see module docstring)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(fh))
            if not dtype.hasobject:
                return np.load(path, allow_pickle=False)
            data = fh.read()
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc}); re-download or re-create it") from None
    try:
        arr = _Restricted(io.BytesIO(data), path).load()
    except InputError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable object array ({type(exc).__name__}: {exc}); re-create it") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: holds a {type(arr).__name__}, expected an array; re-create it")
    if tuple(arr.shape) != tuple(shape):
        arr = arr.reshape(shape, order="F" if fortran else "C")
    return arr
