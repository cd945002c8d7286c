"""Segment label maps per frame (gt instances, SAM, Felzenszwalb, SLIC)."""
