"""TensorRT engine building moved to :mod:`edgeexit.runtime.tensorrt_build` (it runs on the device without torch);
this module re-exports it for the export command and older imports."""

from ..runtime.tensorrt_build import *  # noqa: F401,F403
from ..runtime.tensorrt_build import __all__  # noqa: F401
