"""``report.md``: the report's tables, from ``report.json`` alone.

The results carry what the tables need besides the numbers: each probe's metrics with their better direction and
format (``metrics``), and the one metric per probe of the summary table (``headline``), so that a report reads the
same whichever probes the running snd knows.
"""

from __future__ import annotations

from .statistics import CONFIDENCE


def reported_metrics(results: dict) -> list[tuple[str, str, bool, str]]:
    """``(probe, metric, higher is better, format)`` of every metric the report shows, in order."""
    return [(probe, metric["name"], metric["higher_is_better"], metric["format"])
            for probe, metrics in results["metrics"].items() for metric in metrics]


def _signed(fmt: str, value: float) -> str:
    return ("+" if value >= 0 else "−") + fmt.format(abs(value))


def markdown_report(results: dict) -> str:
    """``report.md`` of ``report.json``'s ``results``: a summary table of each probe's headline metric, then every
    metric of every model with its interval and deltas, then the features and the notes."""
    labels = list(results["models"])
    baseline = labels[0]
    reference = results.get("reference", baseline)
    compared = [label for label in labels if label != reference]
    protocol = results["protocol"]
    statistics = results.get("statistics", {})
    seeds = statistics.get("seeds", [protocol.get("seed")])
    lines = [
        "# 3D-awareness probes", "",
        f"Probes trained on {protocol['probe_train_frames']} frames of {', '.join(protocol['probe_train_scenes'])}, "
        f"tested on {protocol['test_frames']} frames of {', '.join(protocol['test_scenes'])} "
        f"({protocol['image_size'][0]}x{protocol['image_size'][1]}); {protocol['probe_steps']} AdamW steps per probe, "
        f"batch {protocol['probe_batch_size']}, probe seeds {', '.join(map(str, seeds))}; correspondence on "
        f"{protocol['correspondence']['pairs']} pairs at scale {protocol['correspondence']['scale']}. "
        "Every model gets identical probe settings, seeds and test data. Arrows: which direction is better.", "",
        f"Each cell: the mean over probe seeds, then its {round(100 * statistics.get('confidence', CONFIDENCE))} % "
        "interval over seeds and test images (pairs for correspondence; two-level bootstrap, "
        f"{statistics.get('bootstrap_replicates', 0):,} replicates). Each Δ is taken against {reference}, with its "
        "own paired interval; a **bold** Δ is one whose interval excludes 0.", "",
    ]
    reported = reported_metrics(results)
    formats = {(probe, metric): (higher, fmt) for probe, metric, higher, fmt in reported}
    headline = [(probe, metric) for probe, metric in results["headline"].items()
                if results["models"][baseline].get(probe, {}).get(metric) is not None]
    lines += ["| model | " + " | ".join(f"{probe} {metric} {'↑' if formats[(probe, metric)][0] else '↓'}"
                                        for probe, metric in headline) + " |",
              "|---|" + "---|" * len(headline)]
    for label in labels:
        cells = []
        for probe, metric in headline:
            fmt = formats[(probe, metric)][1]
            value = results["models"][label].get(probe, {}).get(metric)
            cell = "–" if value is None else fmt.format(value)
            if label != reference:
                cell += f" (Δ {_delta_text(results, label, probe, metric, fmt)})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| " + " | ".join(["probe", "metric", *labels, *(f"Δ {label}" for label in compared)]) + " |",
              "|---|---|" + "---|" * (len(labels) + len(compared))]
    binned = [("correspondence", key, True, "{:.3f}") for key in results["models"][baseline].get("correspondence", {})
              if key.startswith("recall_10px_rotation_")]
    for probe, metric, higher, fmt in reported + binned:
        values = [results["models"][label].get(probe, {}).get(metric) for label in labels]
        if values[0] is None:
            continue
        cells = []
        for label, value in zip(labels, values):
            bounds = results["models"][label].get("intervals", {}).get(probe, {}).get(metric, [None, None])
            cells.append("–" if value is None else fmt.format(value) + _bounds_text(fmt, bounds, signed=False))
        cells += [_delta_text(results, label, probe, metric, fmt) for label in compared]
        lines.append(f"| {probe} | {metric} {'↑' if higher else '↓'} | " + " | ".join(cells) + " |")
    lines += ["", "Features (stored as float16): " + "; ".join(f"{k}: {v}" for k, v in protocol["features"].items()) + "."]
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _delta_text(results: dict, label: str, probe: str, metric: str, fmt: str) -> str:
    """``+0.050 [+0.027, +0.073]``, bold when the interval excludes 0; ``–`` where there is none."""
    delta = results.get("deltas", {}).get(label, {}).get(probe, {}).get(metric)
    if delta is None or delta["delta"] is None:
        return "–"
    text = _signed(fmt, delta["delta"])
    return (f"**{text}**" if delta["excludes_zero"] else text) + _bounds_text(fmt, delta["interval"], signed=True)


def _bounds_text(fmt: str, bounds, signed: bool) -> str:
    if not bounds or bounds[0] is None:
        return ""
    show = (lambda v: _signed(fmt, v)) if signed else fmt.format
    return f" [{show(bounds[0])}, {show(bounds[1])}]"
