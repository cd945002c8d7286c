"""The artifacts the stages exchange: one module per kind, each holding its key rule, writer and reader.

=================  =========================================================================================
module             artifact
=================  =========================================================================================
``protocol``       what every producer shares: reuse a complete artifact, resume a partial one, or build it
``samples``        the frozen (scene, context pair, targets) samples
``gaussians``      each context pair's pixel-aligned Gaussians
``masks``          each used frame's segment labels
``operators``      each training sample's teacher path as a sparse operator
``features``       a backbone's probe features of a frame set
``ground_truth``   the probes' ground truth of a frame set
``runs``           a training run: its key, checkpoints, exports and manifest
``reports``        an eval report and the identity of what it probed
=================  =========================================================================================

Stages import artifacts, never each other: a stage that needs another's output reads it through its module here.
"""
