"""Reconstructors: turn context views into pixel-aligned 3D Gaussians (a registry by name)."""
