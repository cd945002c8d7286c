"""snd: make 2D vision foundation models 3D-aware with Splat and Distill.

The package is layered one way: ``cli`` -> ``stages`` -> components (``scenes``, ``store``, ...) -> ``geometry``.
"""

__version__ = "0.1.0"
