"""The ``snd`` command line: parse options, load the config, call one stage function, show progress.

Every stage command takes ``--config pipeline.yaml`` and ``--set section.key=value`` overrides for the sections
it reads, ``--force`` to recompute an existing artifact, and the global ``--debug`` to show tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated, Callable

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from .pipeline import PipelineCfg, load_config
from .errors import SndError
from .progress import make_progress
from .store import Store

app = typer.Typer(
    name="snd",
    help="Splat and Distill: make 2D vision foundation models 3D-aware. Stages exchange cached artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_state = {"debug": False, "profile": None}

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="pipeline.yaml to read.")]
SetOption = Annotated[
    list[str],
    typer.Option("--set", "-s", help="Override a config key, e.g. --set sampling.seed=3 (repeatable; YAML values)."),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Recompute even if the artifact already exists.")]
ShardOption = Annotated[
    str | None,
    typer.Option("--shard", help="Do only shard i of n (0-based, 'i/n'); shards share one store, the last one publishes."),
]
WorkersOption = Annotated[
    int,
    typer.Option("--workers", min=0, help="Processes computing the units at once (0: one per 4 cores beside a GPU, "
                 "one on the CPU). What is stored does not depend on it."),
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    profile: Annotated[str | None, typer.Option(
        "--profile", envvar="SND_PROFILE",
        help="Apply a named set of overrides from the config's 'profiles' (pipeline.yaml: cpu, a smoke run; gpu, "
             "a run that shows the method's gains), before --set; 'auto' picks gpu where CUDA is available, else "
             "cpu. Default: none.")] = None,
) -> None:
    _state["debug"] = debug
    _state["profile"] = profile
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=debug, show_time=False)],
        force=True,
    )


def _run(action: Callable[[], None]) -> None:
    """Run a stage; user errors become one red line and exit code 1 (tracebacks only with --debug).

    A failing file system (full disk, permissions) is reported the same way: it is not a bug in snd. Any other
    exception is one line too, saying that it is a bug and how to report it.
    """
    try:
        action()
    except SndError as error:
        if _state["debug"]:
            raise
        _error_line(str(error))
        raise typer.Exit(code=1) from None
    except OSError as error:
        if _state["debug"]:
            raise
        _error_line(f"{error}; finished units and checkpoints are kept: fix the cause and rerun the same command "
                    "(snd --debug shows the traceback)")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished units are kept; rerun the same command to resume")
        raise typer.Exit(code=130) from None
    except (typer.Exit, typer.Abort, click.ClickException):
        raise
    except Exception as error:  # noqa: BLE001 - the last guard: anything else is a bug, said in one line
        if _state["debug"]:
            raise
        detail = (str(error).strip().splitlines() or [""])[0][:300]
        _error_line(f"unexpected {type(error).__name__}{f': {detail}' if detail else ''}. This is a bug in snd, not "
                    "in your input: rerun the same command with snd --debug for the traceback and report it with "
                    "that output. Finished units and checkpoints are kept.")
        raise typer.Exit(code=1) from None


def _error_line(message: str) -> None:
    # Printed verbatim on one line: no markup (messages quote lists such as [min, max]) and no wrapping.
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def _load(config: Path, overrides: list[str], sections: set[str]) -> PipelineCfg:
    profile = _state.get("profile")
    if profile == "auto":
        import torch

        profile = "gpu" if torch.cuda.is_available() else "cpu"
        if not _state.get("profile_said"):
            console.print(f"[cyan]profile[/]: {profile} ({'CUDA found' if profile == 'gpu' else 'no CUDA device'}; "
                          "--profile cpu|gpu chooses)")
            _state["profile_said"] = True
    return load_config(config, overrides, allowed_sections=sections, profile=profile)


def _report(stage: str, result) -> None:
    if result.artifact is None:
        console.print(f"[green]{stage}[/]: this shard is done; {result.pending_units} unit(s) left to other shards")
        return
    if result.skipped:
        console.print(f"[green]{stage}[/]: up to date, nothing to do ({result.artifact.path})")
        return
    for change in result.changes:
        console.print(f"[cyan]{stage}[/]: changed since the last run: {change}")
    if result.resumed_units:
        console.print(f"[cyan]{stage}[/]: resumed, kept {result.resumed_units} finished unit(s)")
    console.print(f"[green]{stage}[/]: wrote {result.artifact.path} ({result.artifact.manifest.get('counts', {})})")


@app.command("make-demo-data")
def make_demo_data_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False
) -> None:
    """Generate the demo RGB-D scenes (the embedded default dataset) in the ScanNet++ layout."""
    from .stages.make_demo_data import make_demo_data

    def action() -> None:
        cfg = _load(config, set_, {"data", "demo"})
        with make_progress() as progress:
            result = make_demo_data(cfg.data, cfg.demo, force=force, progress=progress)
        if result.dataset != "demo":
            console.print(f"[green]make-demo-data[/]: data.dataset is {result.dataset}: nothing to generate, "
                          f"{result.root} is read as it is (snd prepare-scannetpp writes it)")
        elif result.skipped:
            console.print(f"[green]make-demo-data[/]: up to date, nothing to do ({result.root}, key {result.key})")
        else:
            console.print(
                f"[green]make-demo-data[/]: wrote {len(result.generated)} scene(s) to {result.root}"
                + (f", kept {len(result.resumed)} from an interrupted run" if result.resumed else "")
            )

    _run(action)


@app.command("prepare-scannetpp")
def prepare_scannetpp_command(
    raw: Annotated[Path, typer.Option("--raw", help="The ScanNet++ release root (splits/, metadata/, data/<scene>/); "
                                                    "only read.")],
    out: Annotated[Path, typer.Option("--out", help="The prepared root to write (set data.root to it, with "
                                                    "data.dataset=scannetpp).")],
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], shard: ShardOption = None,
) -> None:
    """Prepare the official ScanNet++ release: undistorted, downscaled DSLR frames with depth, instance, class and
    normal maps rendered from the annotated mesh, checked, one scene at a time (resumable, shardable)."""
    from .artifacts.protocol import Shard
    from .stages.prepare_scannetpp import prepare_scannetpp

    def action() -> None:
        cfg = _load(config, set_, {"prepare_scannetpp"})
        with make_progress() as progress:
            result = prepare_scannetpp(raw, out, cfg.prepare_scannetpp, Shard.parse(shard), progress)
        for scene, reason in result.skipped.items():
            console.print(f"[yellow]prepare-scannetpp[/]: skipped {scene}: {escape(reason)}")
        for scene, report in result.reports.items():
            frames = report["frames"]
            excluded = ", ".join(f"{count} {reason}" for reason, count in frames["excluded"].items()) or "none"
            checks = report["checks"]
            depth = checks["depth_median_relative_error"]
            console.print(f"prepare-scannetpp: {scene}: {frames['prepared']} of {frames['listed']} frames (excluded: "
                          f"{escape(excluded)}); pose error {checks['pose_rotation_error_degrees']:.2g} deg / "
                          f"{checks['pose_translation_error_m'] * 1000:.2g} mm; edge shift {checks['edge_shift_px']} px; "
                          f"depth vs COLMAP points {'n/a' if depth is None else f'{depth:.1%}'}")
        console.print(f"[green]prepare-scannetpp[/]: prepared {len(result.prepared)} scene(s) in {result.seconds:.1f} s "
                      f"({result.scenes_per_hour:.0f} scenes/hour), kept {len(result.resumed)} finished earlier, "
                      f"skipped {len(result.skipped)}; wrote {out}")
        if result.failed:
            raise SndError(f"{len(result.failed)} scene(s) failed their checks and were not written: "
                           + " | ".join(result.failed.values()))

    _run(action)


@app.command("sample-views")
def sample_views_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False
) -> None:
    """Freeze (scene, context pair, targets) samples into a manifest the later stages read."""
    from .stages.sample_views import sample_views

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "store"})
        with make_progress() as progress:
            result = sample_views(cfg.data, cfg.sampling, Store(cfg.store.root), force=force, progress=progress)
        _report("sample-views", result)

    _run(action)


def _precompute(stage: str, section: str, config: Path, overrides: list[str], force: bool, shard: str | None,
                workers: int | None = None) -> None:
    """The precompute commands differ only in their stage function and the config sections they read."""
    from .artifacts.protocol import Shard

    if stage == "precompute-gaussians":
        from .stages.precompute_gaussians import precompute_gaussians as function
    elif stage == "precompute-masks":
        from .stages.precompute_masks import precompute_masks as function
    else:
        from .stages.precompute_operators import precompute_operators as function
    sections = ["gaussians", "masks", "train"] if stage == "precompute-operators" else [section]

    def action() -> None:
        cfg = _load(config, overrides, {"data", "sampling", *sections, "store"})
        with make_progress() as progress:
            result = function(cfg.data, cfg.sampling, *(getattr(cfg, name) for name in sections),
                              Store(cfg.store.root), force=force, shard=Shard.parse(shard), progress=progress,
                              **({} if workers is None else {"workers": workers}))
        _report(stage, result)

    _run(action)


@app.command("precompute-gaussians")
def precompute_gaussians_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False, shard: ShardOption = None,
    workers: WorkersOption = 0,
) -> None:
    """Reconstruct pixel-aligned 3D Gaussians once per context pair of the frozen samples."""
    _precompute("precompute-gaussians", "gaussians", config, set_, force, shard, workers)


@app.command("precompute-masks")
def precompute_masks_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False, shard: ShardOption = None
) -> None:
    """Compute a segment label map for every frame the frozen samples use (gt, sam, felzenszwalb or slic)."""
    _precompute("precompute-masks", "masks", config, set_, force, shard)


@app.command("precompute-operators")
def precompute_operators_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False, shard: ShardOption = None,
    workers: WorkersOption = 0,
) -> None:
    """Compose each sample's teacher path (upsample, lift, splat, blend, downsample) into a sparse operator."""
    _precompute("precompute-operators", "train", config, set_, force, shard, workers)


@app.command("train")
def train_command(
    config: ConfigOption = Path("pipeline.yaml"),
    set_: SetOption = [],
    force: Annotated[bool, typer.Option("--force", help="Delete this configuration's run and start over.")] = False,
    resume: Annotated[str, typer.Option(help="'auto' (the newest checkpoint of this run) or a checkpoint file.")] = "auto",
) -> None:
    """Distill a 3D-aware student: teacher features splatted to novel views (Splat and Distill).

    One process, or several under torchrun: torchrun --nproc-per-node N -m snd_stages.cli train (global batch).
    """
    from .distributed import is_main_process
    from .stages.train import train

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "gaussians", "masks", "train", "store"})
        main = is_main_process()  # under torchrun, rank 0 alone shows progress and the summary
        with make_progress() if main else contextlib.nullcontext() as progress:
            result = train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, Store(cfg.store.root),
                           resume=resume, force=force, progress=progress)
        if not main:
            return
        if result.skipped:
            console.print(f"[green]train[/]: up to date, nothing to do ({result.run_dir})")
            return
        if result.start_step:
            console.print(f"[cyan]train[/]: resumed at step {result.start_step}")
        console.print(f"[green]train[/]: {result.steps} steps, final loss {result.final_loss:.4f}; "
                      f"exported {result.student_path} and {result.teacher_path.name}")

    _run(action)


@app.command("run-dir")
def run_dir_command(config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = []) -> None:
    """Print where snd train puts the run of this configuration (its input artifacts must exist), e.g. to list
    several runs for snd eval: --set "eval.runs=[$(snd run-dir --set train.blending=1.0)]"."""
    from .artifacts.runs import run_directory

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "gaussians", "masks", "train", "store"})
        typer.echo(run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, Store(cfg.store.root)))

    _run(action)


@app.command("eval")
def eval_command(config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: Annotated[bool, typer.Option(
        "--force", help="Probe again although the report folder holds the report of these models, data and settings "
                        "(features and ground truth are still read from the store).")] = False) -> None:
    """Probe the baseline and each fine-tuned model side by side: depth, normals, segmentation, correspondence."""
    from .artifacts.runs import run_directory, with_checkpoints
    from .stages.evaluate import evaluate

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "gaussians", "masks", "train", "eval", "store"})
        runs = list(cfg.eval.runs) or [run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train,
                                                   Store(cfg.store.root))]
        runs = with_checkpoints(runs, cfg.eval.checkpoints)
        with make_progress() as progress:
            report = evaluate(cfg.data, cfg.train, cfg.eval, runs, progress, store=Store(cfg.store.root), force=force)
        Console().print((report.report_dir / "report.md").read_text())
        if report.up_to_date:
            console.print(f"[green]eval[/]: up to date: {report.report_dir} holds the report of these models, data and "
                          "settings (--force probes again)")
            return
        reused = sum(use.status == "reused" for use in report.feature_uses)
        console.print(f"[green]eval[/]: features: {reused} of {len(report.feature_uses)} feature sets were up to date "
                      f"in {cfg.store.root / 'features'}, {len(report.feature_uses) - reused} extracted")
        console.print(f"[green]eval[/]: wrote {report.report_dir / 'report.json'}, report.md and "
                      f"{', '.join(p.name for p in report.figures)}")

    _run(action)


@app.command("check-geometry")
def check_geometry_command(
    config: ConfigOption = Path("pipeline.yaml"),
    set_: SetOption = [],
    pairs: Annotated[int, typer.Option(help="How many context pairs to re-render.")] = 4,
    out: Annotated[Path, typer.Option(help="Folder for the PNG pictures.")] = Path("data/reports"),
) -> None:
    """Re-render stored Gaussians with their source colours at the targets: PSNR and coverage vs the real images."""
    from rich.table import Table

    from .stages.check_geometry import check_geometry

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "gaussians", "store"})
        device = "cuda" if torch_cuda_available() else "cpu"
        with make_progress() as progress:
            report = check_geometry(cfg.data, cfg.sampling, cfg.gaussians, Store(cfg.store.root), pairs, out, device, progress)
        table = Table(title="Colours splatted from the context views vs the real target images")
        for column in ("pair", "target", "PSNR (dB, covered pixels)", "coverage"):
            table.add_column(column)
        for check in report.checks:
            table.add_row(check.pair, check.target_frame, f"{check.psnr:.2f}", f"{check.coverage:.1%}")
        table.add_row("mean", "", f"{report.mean_psnr:.2f}", f"{report.mean_coverage:.1%}")
        Console().print(table)
        console.print(f"pictures: {', '.join(str(p) for p in report.pictures)}")

    _run(action)


@app.command("export-ply")
def export_ply_command(
    out: Annotated[Path, typer.Argument(help="PLY file to write.")],
    config: ConfigOption = Path("pipeline.yaml"),
    set_: SetOption = [],
    pair: Annotated[str | None, typer.Option(help="Context pair unit, e.g. demo0000--00003-00009 (default: the first).")] = None,
) -> None:
    """Export one context pair's Gaussians as a coloured point cloud (open3d PLY) for viewing."""
    from .stages.check_geometry import export_pair_ply

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "gaussians", "store"})
        name = export_pair_ply(cfg.data, cfg.sampling, cfg.gaussians, Store(cfg.store.root), pair, out)
        console.print(f"[green]export-ply[/]: wrote {out} (pair {name})")

    _run(action)


@app.command("check-store")
def check_store_command(config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = []) -> None:
    """Verify every artifact in the store file by file (sizes and checksums); exit 1 if any is damaged."""
    from rich.table import Table

    from .stages.check_store import check_store

    def action() -> None:
        cfg = _load(config, set_, {"store"})
        with make_progress() as progress:
            result = check_store(Store(cfg.store.root), progress)
        table = Table(title=f"Artifacts in {cfg.store.root}")
        for column in ("stage", "artifact", "status", "units", "MB", "detail"):
            table.add_column(column, overflow="fold")
        colours = {"ok": "green", "damaged": "bold red", "incomplete": "yellow", "older format": "cyan",
                   "leftover": "yellow"}
        for check in result.checks:
            table.add_row(check.stage, check.path.name, f"[{colours[check.status]}]{check.status}[/]", str(check.units),
                          f"{check.size / 1e6:.1f}", escape(check.detail))
        Console().print(table)
        megabytes = result.verified_bytes / 1e6
        console.print(f"check-store: verified {megabytes:,.1f} MB in {result.seconds:.1f} s "
                      f"({megabytes / max(result.seconds, 1e-9):,.0f} MB/s)")
        if result.damaged:
            raise SndError(f"{len(result.damaged)} damaged artifact(s) in {cfg.store.root} (first: "
                           f"{result.damaged[0].detail})")
        console.print(f"[green]check-store[/]: no damage among {len(result.checks)} artifact(s)")

    _run(action)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
