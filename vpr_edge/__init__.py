"""vpr-edge: foundation-model place recognition (AnyLoc, BoQ) from PyTorch to edge GPUs.

Importing the package is cheap and never imports torch: the lean runtime depends on that.
"""

__version__ = "0.1.0"
