"""Images on the ground floor: decoding (`decode`), the resize geometry (`geometry`) and the exact
numpy/Pillow preprocessing (`exact`), shared by the PyTorch reference and the lean runtime."""

from vpr_edge.imaging.decode import ImageSource, load_rgb
from vpr_edge.imaging.exact import preprocess_image, preprocess_rgb
from vpr_edge.imaging.geometry import resize_plan

__all__ = ["ImageSource", "load_rgb", "preprocess_image", "preprocess_rgb", "resize_plan"]
