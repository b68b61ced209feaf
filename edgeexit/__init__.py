"""edgeexit: early-exit CNN classifiers for edge cameras.

Importing this package never imports torch: the runtime (``edgeexit.runtime``) runs on devices that only
have numpy and an inference engine.
"""

__version__ = "0.1.0"
