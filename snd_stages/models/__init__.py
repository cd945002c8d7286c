"""Vision backbones: creation by name and strict, format-aware weight loading."""
