"""Probes of 3D awareness: depth, surface normals, multi-view correspondence, semantic segmentation."""
