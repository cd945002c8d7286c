"""Splatting features: mask-aware lifting, rendering (gsplat on CUDA, a torch twin on CPU), blending."""
