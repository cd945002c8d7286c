"""Each training sample's teacher path as one sparse operator, as ``snd precompute-operators`` stores it.

One unit per (context pair, target frame):

three sparse matrices: ``local`` CSR ``[T, S]`` (the rendered features, downsampled), ``segment_means`` ``[K, S]``
(the mean of the rendered features over each target segment) and ``segment_spread`` ``[T, K]`` (each token's share
of each segment mean), the tokens some Gaussian reached (``coverage``) and the teacher's token grid of a context view,
stored as :meth:`~snd_stages.splat.operator.SplatOperator.to_arrays` packs them: five arrays, the matrices' CSR
parts one after the other. Schema 1 stored each part as its own array (14 arrays); a unit's fixed cost per array made
writing one take 37 ms and reading it 16 ms, against 11 and 5 ms packed (2 cores, ``benchmarks/compression.py``).

The key holds what changes the map: the Gaussians and masks artifacts, the samples, the ViT patch size and
``train.mask_aware_upsampling`` / ``train.reference_quirks``. The blending coefficient is applied at training
time, so changing it needs no new operators.
"""

from __future__ import annotations

from ..config import TrainCfg
from ..models.backbones import backbone_spec
from ..splat.operator import SplatOperator
from ..store import Artifact, ArtifactSpec, Store, UnitArrays
from .gaussians import pair_unit_name

STAGE = "operators"
SCHEMA_VERSION = 2  # 2: five packed arrays (1: fourteen, the same values)


def operator_unit_name(scene: str, context: tuple[int, int], target: int) -> str:
    return f"{pair_unit_name(scene, context)}--{target:05d}"


def operators_spec(train: TrainCfg, samples_key: str, gaussians_key: str, masks_key: str) -> ArtifactSpec:
    params = {"patch": backbone_spec(train.backbone).patch, "mask_aware_upsampling": train.mask_aware_upsampling,
              "reference_quirks": train.reference_quirks}
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params,
                        inputs={"samples": samples_key, "gaussians": gaussians_key, "masks": masks_key})


def operator_unit(operator: SplatOperator, scene: str, context: tuple[int, int], target: int) -> UnitArrays:
    """One (context pair, target) unit: the operator's five packed arrays."""
    arrays = operator.to_arrays()
    return UnitArrays(arrays, {"scene": scene, "context_positions": list(context), "target_position": target,
                               "nonzeros": operator.nonzeros(),
                               "bytes": int(sum(values.nbytes for values in arrays.values()))})


def write_operator(writer, name: str, operator: SplatOperator, scene: str, context: tuple[int, int],
                   target: int) -> None:
    """Write one (context pair, target) unit."""
    writer.write_unit(name, operator_unit(operator, scene, context, target))


def load_operators(store: Store, train: TrainCfg, samples_key: str, gaussians_key: str, masks_key: str) -> Artifact:
    spec = operators_spec(train, samples_key, gaussians_key, masks_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)


def read_operator(group) -> SplatOperator:
    return SplatOperator.from_arrays(group)
