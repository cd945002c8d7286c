"""snd: make 2D vision foundation models 3D-aware with Splat and Distill.

The package is layered one way: ``cli`` -> ``stages`` -> components (``scenes``, ``store``, ...) -> ``geometry``;
docs/architecture.md says what each package owns, and an import contract (pyproject.toml) keeps the arrows down.
"""

__version__ = "0.1.0"
