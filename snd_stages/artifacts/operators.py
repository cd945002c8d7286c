"""Each training sample's teacher path as one sparse operator, as ``snd precompute-operators`` stores it.

One unit per (context pair, target frame):

=========================  ========  ==============================================================
array                      dtype     meaning
=========================  ========  ==============================================================
local_crow / _col / _values  int32 / uint16 / float32   CSR ``[T, S]``: rendered features, downsampled
segment_means_*            as above  CSR ``[K, S]``: mean of the rendered features over each target segment
segment_spread_*           as above  CSR ``[T, K]``: each token's share of each segment mean
*_shape                    int64     the matrices' shapes
coverage                   bool      ``[th, tw]`` tokens some Gaussian reached
context_grid               int64     ``(h, w)`` the teacher's token grid of a context view
=========================  ========  ==============================================================

The key holds what changes the map: the Gaussians and masks artifacts, the samples, the ViT patch size and
``train.mask_aware_upsampling`` / ``train.reference_quirks``. The blending coefficient is applied at training
time, so changing it needs no new operators.
"""

from __future__ import annotations

from ..config import TrainCfg
from ..models.backbones import backbone_spec
from ..splat.operator import SplatOperator
from ..store import Artifact, ArtifactSpec, Store
from .gaussians import pair_unit_name

STAGE = "operators"
SCHEMA_VERSION = 1


def operator_unit_name(scene: str, context: tuple[int, int], target: int) -> str:
    return f"{pair_unit_name(scene, context)}--{target:05d}"


def operators_spec(train: TrainCfg, samples_key: str, gaussians_key: str, masks_key: str) -> ArtifactSpec:
    params = {"patch": backbone_spec(train.backbone).patch, "mask_aware_upsampling": train.mask_aware_upsampling,
              "reference_quirks": train.reference_quirks}
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params,
                        inputs={"samples": samples_key, "gaussians": gaussians_key, "masks": masks_key})


def write_operator(writer, name: str, operator: SplatOperator, scene: str, context: tuple[int, int],
                   target: int) -> None:
    """Write one (context pair, target) unit."""
    with writer.unit(name) as group:
        arrays = operator.to_arrays()
        for array_name, values in arrays.items():
            group.create_array(array_name, data=values)
        group.update_attributes({"scene": scene, "context_positions": list(context), "target_position": target,
                            "nonzeros": operator.nonzeros(),
                            "bytes": int(sum(values.nbytes for values in arrays.values()))})


def load_operators(store: Store, train: TrainCfg, samples_key: str, gaussians_key: str, masks_key: str) -> Artifact:
    spec = operators_spec(train, samples_key, gaussians_key, masks_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)


def read_operator(group) -> SplatOperator:
    return SplatOperator.from_arrays(group)
