"""Images on the ground floor: decoding (`decode`), the resize geometry (`geometry`), the exact
numpy/Pillow preprocessing (`exact`, shared with the PyTorch reference), the fast one (`fast`), and the
one place that picks between them (`prepare`)."""

from vpr_edge.imaging.decode import ImageSource, load_rgb
from vpr_edge.imaging.exact import preprocess_image, preprocess_rgb
from vpr_edge.imaging.geometry import resize_plan
from vpr_edge.imaging.prepare import CHANNELS, LAYOUTS, MODES, check, prepare

__all__ = ["CHANNELS", "LAYOUTS", "MODES", "ImageSource", "check", "load_rgb", "prepare", "preprocess_image",
           "preprocess_rgb", "resize_plan"]
