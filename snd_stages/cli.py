"""The ``snd`` command line: parse options, load the config, call one stage function, show progress.

Every stage command takes ``--config pipeline.yaml`` and ``--set section.key=value`` overrides for the sections
it reads, ``--force`` to recompute an existing artifact, and the global ``--debug`` to show tracebacks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler

from .config import PipelineCfg, load_config
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
_state = {"debug": False}

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


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=debug, show_time=False)],
        force=True,
    )


def _run(action: Callable[[], None]) -> None:
    """Run a stage; user errors become one red line and exit code 1 (tracebacks only with --debug)."""
    try:
        action()
    except SndError as error:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished units are kept; rerun the same command to resume")
        raise typer.Exit(code=130) from None


def _load(config: Path, overrides: list[str], sections: set[str]) -> PipelineCfg:
    return load_config(config, overrides, allowed_sections=sections)


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
        if result.skipped:
            console.print(f"[green]make-demo-data[/]: up to date, nothing to do ({result.root}, key {result.key})")
        else:
            console.print(
                f"[green]make-demo-data[/]: wrote {len(result.generated)} scene(s) to {result.root}"
                + (f", kept {len(result.resumed)} from an interrupted run" if result.resumed else "")
            )

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


@app.command("precompute-gaussians")
def precompute_gaussians_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False, shard: ShardOption = None
) -> None:
    """Reconstruct pixel-aligned 3D Gaussians once per context pair of the frozen samples."""
    from .stages.common import Shard
    from .stages.precompute_gaussians import precompute_gaussians

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "gaussians", "store"})
        with make_progress() as progress:
            result = precompute_gaussians(
                cfg.data, cfg.sampling, cfg.gaussians, Store(cfg.store.root), force=force, shard=Shard.parse(shard),
                progress=progress,
            )
        _report("precompute-gaussians", result)

    _run(action)


@app.command("precompute-masks")
def precompute_masks_command(
    config: ConfigOption = Path("pipeline.yaml"), set_: SetOption = [], force: ForceOption = False, shard: ShardOption = None
) -> None:
    """Compute a segment label map for every frame the frozen samples use (gt, sam, felzenszwalb or slic)."""
    from .stages.common import Shard
    from .stages.precompute_masks import precompute_masks

    def action() -> None:
        cfg = _load(config, set_, {"data", "sampling", "masks", "store"})
        with make_progress() as progress:
            result = precompute_masks(
                cfg.data, cfg.sampling, cfg.masks, Store(cfg.store.root), force=force, shard=Shard.parse(shard),
                progress=progress,
            )
        _report("precompute-masks", result)

    _run(action)


def main() -> None:
    """Console-script entry point."""
    app()
