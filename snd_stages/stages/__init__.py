"""Stages: each a function from input artifacts (and a typed config) to an output artifact."""
