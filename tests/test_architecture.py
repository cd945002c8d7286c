"""The package's import contract (pyproject.toml, [tool.importlinter]): layers import only downwards, and stages
never import each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(*config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *map(str, config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_layers_import_only_downwards():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    # the same checker with two layers swapped: the stages import the store, so this contract must break
    inverted = tmp_path / "inverted.toml"
    inverted.write_text('[tool.importlinter]\nroot_package = "snd_stages"\n\n[[tool.importlinter.contracts]]\n'
                        'name = "inverted"\ntype = "layers"\nlayers = ["snd_stages.store", "snd_stages.stages"]\n')
    result = lint_imports(inverted)
    assert result.returncode == 1 and "snd_stages.stages is not allowed to import snd_stages.store" in result.stdout


def test_the_contract_catches_one_stage_importing_another(tmp_path):
    # train reads the samples through snd_stages.artifacts; a contract that also binds the artifacts must break
    coupled = tmp_path / "coupled.toml"
    coupled.write_text('[tool.importlinter]\nroot_package = "snd_stages"\n\n[[tool.importlinter.contracts]]\n'
                       'name = "coupled"\ntype = "independence"\n'
                       'modules = ["snd_stages.stages.train", "snd_stages.artifacts.samples"]\n')
    result = lint_imports(coupled)
    assert result.returncode == 1 and "snd_stages.stages.train is not allowed to import snd_stages.artifacts.samples" \
        in result.stdout


def test_the_commands_and_the_precompute_stages_start_without_timm():
    """timm, with the torchvision and torch._dynamo it imports, takes over a second to import: the CLI (whose every
    command reads the config's registries) and the precompute stages (which their worker processes import) do
    without it until a backbone is built."""
    code = ("import sys, snd_stages.cli, snd_stages.stages.precompute_gaussians, "
            "snd_stages.stages.precompute_operators; "
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'timm', 'torchvision'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
