"""pipeline.yaml loading: defaults, overrides, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from snd_stages.config import dump_yaml

from snd_stages.pipeline import PipelineCfg, load_config
from snd_stages.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_repository_pipeline_yaml_loads_and_matches_the_defaults():
    # The shipped pipeline.yaml spells out every default: drift between the two would confuse users.
    assert load_config(REPO / "pipeline.yaml") == PipelineCfg()


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(write(tmp_path, "sampling:\n  seed: 1\n"), ["sampling.frame_gap=[6, 9]", "demo.width=64"])
    assert cfg.sampling.seed == 1
    assert cfg.sampling.frame_gap == (6, 9)
    assert cfg.demo.width == 64
    assert isinstance(cfg.data.root, Path)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["sampling.frame_gap=[8,8]", "data.root=/x/y"])
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("sampling:\n  frame_gapp: [4, 8]\n", ["unknown key", "sampling.frame_gapp", "did you mean 'sampling.frame_gap'"]),
        ("sampler: {}\n", ["unknown key", "'sampler'", "did you mean 'sampling'"]),
        ("data:\n  dataset: scannet\n", ["data.dataset", "'scannet'", "demo", "scannetpp"]),
        ("demo:\n  height: 12.5\n", ["demo.height", "12.5", "integer"]),
        ("demo:\n  height: 8\n", ["demo.height", "8", ">= 16"]),
        ("sampling:\n  frame_gap: [9, 4]\n", ["sampling.frame_gap", "[9, 4]", "min <= max"]),
        ("sampling:\n  frame_gap: 8\n", ["sampling.frame_gap", "list of 2"]),
        ("sampling:\n  exclude_context_targets: 'yes'\n", ["sampling.exclude_context_targets", "true or false"]),
        ("sampling:\n  frame_gap: [2, 4]\n  targets_per_sample: 3\n", ["sampling.targets_per_sample", "at most 1"]),
        ("sampling:\n  targets: both\n", ["sampling.targets", "'both'", "'novel', 'context'"]),
        ("sampling:\n  targets: context\n  targets_per_sample: 3\n", ["sampling.targets_per_sample", "at most 2"]),
        ("train:\n  loss: l2\n", ["train.loss", "'l2'", "'dino', 'cosine'"]),
        ("train:\n  teacher: student\n", ["train.teacher", "'student'", "'ema', 'frozen'"]),
        ("gaussians:\n  reconstructor: nerf\n", ["gaussians.reconstructor", "'nerf'", "['depth', 'depthsplat', 'mvsplat']"]),
        ("masks:\n  source: grabcut\n", ["masks.source", "'grabcut'", "'felzenszwalb'", "'gt'", "'sam'", "'slic'"]),
        ("gaussians:\n  depth:\n    footprint_scale: 0.01\n", ["gaussians.depth.footprint_scale = 0.01", "[0.05, 10]"]),
        ("gaussians:\n  depth:\n    covariance: cube\n", ["gaussians.depth.covariance", "'disk', 'isotropic'"]),
        ("gaussians:\n  depth:\n    footprintscale: 1\n", ["unknown key 'gaussians.depth.footprintscale'",
                                                             "did you mean 'gaussians.depth.footprint_scale'"]),
        ("gaussians:\n  reconstructor: mvsplat\n", ["gaussians.mvsplat.checkpoint = None", "RE10K checkpoint"]),
        ("gaussians:\n  mvsplat:\n    near: 5\n    far: 2\n", ["gaussians.mvsplat.far = 2.0", "> near = 5.0"]),
        ("masks:\n  slic:\n    segments: 1\n", ["masks.slic.segments = 1", ">= 2"]),
        ("gaussians:\n  footprint_scale: 1.0\n", ["gaussians.footprint_scale is now gaussians.depth.footprint_scale"]),
        ("masks:\n  sam_checkpoint: sam.pth\n", ["masks.sam_checkpoint is now masks.sam.checkpoint"]),
        ("- just\n- a list\n", ["mapping"]),
        ("data: [1, 2]\n", ["data", "mapping"]),
        ("demo: {seed: [\n", ["not valid YAML"]),
    ],
)
def test_bad_config_errors_name_key_value_and_allowed(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, "demo:\n  seed: x\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_missing_config_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*--config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("sampling.seed", "section.key=value"),
        ("seed=3", "dotted key"),
        ("sampling.seed=x", "must be an integer"),
        ("sampling.nope=1", "unknown key"),
        ("demo.seed.x=1", "demo.seed .* must be an integer"),
    ],
)
def test_bad_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_frame_cache_size_is_not_negative():
    with pytest.raises(ConfigError, match="train.frame_cache_mb = -1 .*0 = no cache"):
        load_config(None, ["train.frame_cache_mb=-1"])
    assert load_config(None, ["train.frame_cache_mb=0"]).train.frame_cache_mb == 0


def test_cuda_graphs_need_compile():
    with pytest.raises(ConfigError, match="train.cuda_graphs = True .*train.compile is true"):
        load_config(None, ["train.cuda_graphs=true"])
    assert load_config(None, ["train.compile=true", "train.cuda_graphs=true"]).train.cuda_graphs


def test_overrides_limited_to_the_sections_a_command_reads():
    with pytest.raises(ConfigError, match="reads only the sections"):
        load_config(None, ["demo.seed=1"], allowed_sections={"sampling", "data"})


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == PipelineCfg()


def test_dump_is_plain_yaml():
    document = yaml.safe_load(dump_yaml(PipelineCfg()))
    assert document["sampling"]["frame_gap"] == [4, 8]
    assert document["data"]["root"] == "data/demo"


def test_a_profile_overrides_the_file_and_the_command_line_overrides_the_profile(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("train:\n  steps: 6\nprofiles:\n  long:\n    train.steps: 4000\n    eval.seeds: [0, 1, 2, 3]\n")
    assert load_config(path).train.steps == 6
    long = load_config(path, profile="long")
    assert long.train.steps == 4000 and long.eval.seeds == (0, 1, 2, 3)
    assert load_config(path, ["train.steps=10"], profile="long").train.steps == 10
    with pytest.raises(ConfigError, match=r"profile 'short' is not defined in .*pipeline.yaml; its profiles: \['long'\]"):
        load_config(path, profile="short")
    path.write_text("profiles:\n  bad:\n    train.stepz: 1\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(path, profile="bad")


def test_the_shipped_profiles_load_and_the_gpu_one_trains_64000_samples():
    shipped = Path(__file__).resolve().parents[1] / "pipeline.yaml"
    gpu = load_config(shipped, profile="gpu")
    assert gpu.train.steps * gpu.train.batch_size == 64_000 and gpu.data.root != load_config(shipped).data.root
    assert load_config(shipped, profile="cpu").train.steps == load_config(shipped).train.steps


def test_a_moved_key_on_the_command_line_is_named_with_where_it_went():
    with pytest.raises(ConfigError, match=r"--set gaussians.mvsplat_checkpoint=x.ckpt: gaussians.mvsplat_checkpoint is "
                                          r"now gaussians.mvsplat.checkpoint"):
        load_config(None, ["gaussians.mvsplat_checkpoint=x.ckpt"])


def test_only_the_chosen_components_settings_enter_the_keys():
    from snd_stages.artifacts.gaussians import gaussians_spec
    from snd_stages.artifacts.masks import masks_spec

    def masks_key(*overrides):
        return masks_spec(load_config(None, list(overrides)).masks, "samples").key

    def gaussians_key(*overrides):
        return gaussians_spec(load_config(None, list(overrides)).gaussians, "samples").key

    # gt masks have no settings: the superpixel sources' settings change nothing
    assert masks_key("masks.felzenszwalb.scale=20", "masks.slic.segments=9") == masks_key()
    assert masks_spec(load_config(None, []).masks, "s").params == {"source": "gt"}
    chosen = "masks.source=felzenszwalb"
    assert masks_key(chosen, "masks.felzenszwalb.scale=20") != masks_key(chosen)
    assert masks_key(chosen, "masks.slic.segments=9", "masks.sam.points_per_side=4") == masks_key(chosen)
    # the depth reconstructor's key ignores MVSplat's settings and the device, and holds its own
    assert gaussians_key("gaussians.mvsplat.near=2", "gaussians.device=cpu") == gaussians_key()
    assert gaussians_key("gaussians.depth.opacity=0.5") != gaussians_key()
    params = gaussians_spec(load_config(None, []).gaussians, "s").params
    assert params == {"reconstructor": "depth", "depth": {"covariance": "disk", "footprint_scale": 0.7,
                                                           "disk_thickness": 0.1, "opacity": 1.0,
                                                           "invalid_depth": "drop", "normals": "dataset"}}


def test_each_registered_component_with_settings_is_a_sub_section_of_its_section():
    import dataclasses

    from snd_stages.masks import MASK_SOURCES, MasksCfg
    from snd_stages.reconstruct import RECONSTRUCTORS, GaussiansCfg

    gaussians = {field.name: field.type for field in dataclasses.fields(GaussiansCfg)}
    assert gaussians == {"reconstructor": "str", "device": "Literal['auto', 'cpu', 'cuda']",
                         **{name: entry.settings for name, entry in RECONSTRUCTORS.items()}}
    masks = {field.name: field.type for field in dataclasses.fields(MasksCfg)}
    assert masks == {"source": "str", **{name: entry.settings for name, entry in MASK_SOURCES.items() if entry.settings}}
    assert "gt" not in masks and GaussiansCfg().depth == RECONSTRUCTORS["depth"].settings()


def test_every_section_pickles_to_an_equal_section():
    """Worker processes receive sections by pickle, which finds a class by its module and name: the sections that
    registries assemble (gaussians, masks) must name the module that holds them, on every Python."""
    import importlib
    import pickle

    cfg = load_config(None, ["gaussians.depth.footprint_scale=0.5", "masks.source=slic"])
    for name in ("data", "sampling", "gaussians", "masks", "train", "eval"):
        section = getattr(cfg, name)
        cls = type(section)
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls, name
        assert pickle.loads(pickle.dumps(section)) == section, name
