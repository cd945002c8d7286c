"""What ``snd train`` records of its progress, for learning curves: whether more training still helps.

In the run directory, written by the main process only:

- ``metrics.csv``: every ``train.log_every`` steps the step's loss, KL, teacher coverage, learning rate, speed;
- ``validation.csv``: at step 0 (the pretrained model), every ``train.validate_every`` steps and at the last step,
  the student's correspondence recall at 5/10/20 px on ``train.validation_pairs`` fixed pairs of the held-out
  (val) scenes of ``data.root``: Probe3D's training-free probe as ``snd eval`` runs it
  (:mod:`snd_stages.probes.correspondence`), on the current student with its LoRA merged;
- TensorBoard event files of both (``tensorboard --logdir data/runs``): ``train/*`` and ``validation/*`` scalars
  against the step;
- ``curves.png``: loss and validation recall against the step (and samples seen), redrawn at every validation
  and at the end.

Validation leaves training as it would be without it: it runs on a merged copy of the student in eval mode (the
student's own mode and weights are not touched) with the random generators' states restored afterwards, so a run
ends on the same weights with validation on or off. A resumed run drops the rows (and TensorBoard events) of
steps after its checkpoint, which it trains again, so each step appears once.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import torch

from ..config import DataCfg, EvalCfg, TrainCfg
from ..errors import DataError
from ..models.distill import StudentTeacher
from ..models.lora import merged_backbone
from .backbone import DENSE_FEATURES, ProbeBackbone
from .correspondence import correspondence_probe, held_out_pairs, pairs_frame_set
from .features import features_in_memory
from ..scenes.layout import list_scene_ids
from ..store import write_text_atomic

log = logging.getLogger(__name__)

RECALLS = ("recall_5px", "recall_10px", "recall_20px")
TRAINING_SCALARS = ("loss", "kl", "coverage", "lr", "samples_per_s")


class LearningCurves:
    """The run's logs and validation, opened when training (re)starts at ``start_step``.

    Args:
        run_dir: the run directory.
        data: where the held-out scenes are (``data.root``'s val split).
        train: the run's settings (``validate_every``, ``validation_pairs``, ``validation_scale``, ``batch_size``).
        start_step: steps already done (a resumed run); later rows are dropped.
        device: where the student is; validation runs there.
    """

    def __init__(self, run_dir: Path, data: DataCfg, train: TrainCfg, start_step: int, device: torch.device):
        from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard's protobufs: only when training

        self.run_dir = Path(run_dir)
        self.train = train
        self.device = device
        self.metrics_path = self.run_dir / "metrics.csv"
        self.validation_path = self.run_dir / "validation.csv"
        for path in (self.metrics_path, self.validation_path):
            forget_rows_after(path, start_step)
        self.pairs = validation_pairs(data, train) if train.validate_every else []
        # The correspondence protocol of snd eval (gaps, top-k, seed) at the validation's own scale.
        self.protocol = EvalCfg(correspondence_scale=train.validation_scale)
        # purge_step: TensorBoard drops the events of steps the interrupted run logged after its checkpoint.
        self.writer = SummaryWriter(str(self.run_dir), purge_step=start_step + 1 if start_step else None)

    def due(self, step: int, steps: int) -> bool:
        """Whether to validate once ``step`` steps are done (of ``steps``)."""
        every = self.train.validate_every
        return bool(self.pairs) and every > 0 and (step % every == 0 or step == steps)

    def log_training(self, row: dict) -> None:
        """Append a step's row (``step`` and :data:`TRAINING_SCALARS`, ...) to metrics.csv and TensorBoard."""
        append_row(self.metrics_path, row)
        for name in TRAINING_SCALARS:
            if name in row and math.isfinite(row[name]):
                self.writer.add_scalar(f"train/{name}", row[name], row["step"])
        self.writer.flush()

    def validate(self, model: StudentTeacher, step: int) -> dict[str, float]:
        """The current student's recall on the validation pairs, logged as done at ``step``; the curve redrawn."""
        started = time.perf_counter()
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            student = merged_backbone(model.student)  # a copy in eval mode: no dropout, the student untouched
            backbone = ProbeBackbone.of_model(student, self.train.backbone, "student", f"student at step {step}",
                                              identity=f"run {self.run_dir.name} step {step}")
            sets = features_in_memory(backbone, pairs_frame_set(self.pairs, None), [DENSE_FEATURES])
            scores, _ = correspondence_probe(sets[DENSE_FEATURES], self.pairs, self.protocol, self.device)
            del student, backbone, sets
        recalls = {name: scores[name].estimate() for name in RECALLS}
        append_row(self.validation_path, {"step": step, "samples_seen": step * self.train.batch_size,
                                          **{f"val_{name}": value for name, value in recalls.items()},
                                          "seconds": time.perf_counter() - started})
        for name, value in recalls.items():
            self.writer.add_scalar(f"validation/{name}", value, step)
        self.writer.flush()
        self.draw()
        log.info("step %d: validation recall %s (%d pairs, %.1f s)", step,
                 ", ".join(f"{value:.3f} @{name.removeprefix('recall_')}" for name, value in recalls.items()),
                 len(self.pairs), time.perf_counter() - started)
        return recalls

    def draw(self) -> Path:
        """``curves.png`` from metrics.csv and validation.csv."""
        path = self.run_dir / "curves.png"
        draw_curves(read_rows(self.metrics_path), read_rows(self.validation_path), self.train.batch_size, path)
        return path

    def close(self) -> None:
        self.draw()
        self.writer.close()


def validation_pairs(data: DataCfg, train: TrainCfg) -> list:
    """``train.validation_pairs`` pairs of the held-out scenes, drawn as ``snd eval`` draws its own.

    Where ``data.root`` has no usable held-out scene there is nothing to validate on: training goes on without
    validation, and a warning says why (training does not need those scenes).
    """
    defaults = EvalCfg()
    try:
        scene_ids = list_scene_ids(data.root, "val")
        return held_out_pairs(data.root, scene_ids, train.validation_pairs, defaults.correspondence_gap, defaults.seed)
    except DataError as error:
        log.warning("no validation during training: its held-out (val) scenes are unusable: %s (train.validate_every: "
                    "0 silences this)", error)
        return []


# ---------------------------------------------------------------------------------------------------------------
# CSV logs
# ---------------------------------------------------------------------------------------------------------------


def forget_rows_after(path: Path, step: int) -> None:
    """Drop the rows of steps after ``step`` (logged before an interruption, to be trained again on resume), so
    each step appears once; rewritten atomically."""
    if not path.is_file():
        return
    rows = read_rows(path)
    kept = [row for row in rows if int(row["step"]) <= step]
    if len(kept) == len(rows):
        return
    lines = [",".join(rows[0].keys())] + [",".join(row.values()) for row in kept]
    write_text_atomic(path, "\r\n".join(lines) + "\r\n")


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------------------------


def draw_curves(metrics: list[dict], validation: list[dict], batch_size: int, path: Path) -> None:
    """The distillation's KL (left; the loss where there is no KL) and validation recall (right) against the step,
    samples seen along the top.

    The DINO loss itself is a poor curve: it sits at about log 65,536 = 11.09 from the first step to the last (the
    weight-normed prototypes give near-uniform distributions), and moves by 1e-4, below the precision it is logged
    with. Its KL part (loss minus the teacher's entropy: what the student can still remove) is what changes, over
    decades, so it is drawn on a log scale.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, recall_axes = figure.subplots(1, 2)
    kl = [(int(row["step"]), float(row["kl"])) for row in metrics if _positive(row.get("kl"))]
    if kl:
        loss_axes.plot(*zip(*kl), color="tab:blue")
        loss_axes.set(title="distillation KL (loss − teacher entropy)", xlabel="step", ylabel="nats", yscale="log")
    else:  # the cosine loss (ablation C) has no KL
        loss_axes.plot([int(row["step"]) for row in metrics], [float(row["loss"]) for row in metrics], color="tab:blue")
        loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    for name in RECALLS:
        points = [(int(row["step"]), float(row[f"val_{name}"])) for row in validation]
        if points:
            recall_axes.plot(*zip(*points), marker="o", label=name.removeprefix("recall_"))
    recall_axes.set(title="validation correspondence recall", xlabel="step", ylabel="recall", ylim=(0, 1))
    if validation:
        recall_axes.legend(title="within")
    else:
        recall_axes.text(0.5, 0.5, "no validation (train.validate_every: 0 or no held-out scenes)",
                         ha="center", va="center", transform=recall_axes.transAxes)
    for axes in (loss_axes, recall_axes):
        samples = axes.secondary_xaxis("top", functions=(lambda s: s * batch_size, lambda n: n / batch_size))
        samples.set_xlabel("samples seen")
        axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    temporary.replace(path)


def _positive(text) -> bool:
    """Whether a CSV cell holds a finite number above 0 (a log scale's domain)."""
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except (TypeError, ValueError):
        return False
