"""Properties that must hold for every input, checked on random ones (hypothesis): config parsing, artifact keys,
camera and quaternion conventions.

The config strategies are derived from the dataclasses' type hints, so new fields are covered without
touching this file; values a field's own range check rejects are skipped, not counted as failures.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from snd_stages.config import build, dump_yaml

from snd_stages.pipeline import PipelineCfg, load_config
from snd_stages.errors import ConfigError
from snd_stages.geometry import (
    Camera,
    check_rigid,
    pixel_centers,
    project_points,
    quaternion_to_rotation_matrix,
    rotation_matrix_to_quaternion,
    unproject_depth,
)
from snd_stages.store import ArtifactSpec

MODEST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def sections_of(cls, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every section and a component's sub-section (``gaussians.depth``), dotted -> its fields' type hints."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            found[f"{prefix}{name}"] = typing.get_type_hints(hint)
            found.update(sections_of(hint, f"{prefix}{name}."))
    return found


HINTS = sections_of(PipelineCfg)
SECTIONS = sorted(HINTS)


def nested(section: str, fields: dict) -> dict:
    """``("gaussians.depth", {"opacity": 1})`` -> ``{"gaussians": {"depth": {"opacity": 1}}}``."""
    for part in reversed(section.split(".")):
        fields = {part: fields}
    return fields


def merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into

# ---------------------------------------------------------------------------------------------------------------
# Config


words = st.text(st.sampled_from("abcxyz019_-. /:#'\"é"), min_size=1, max_size=12)
finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False) | st.floats(0, 1)


def value_of(annotation) -> st.SearchStrategy:
    """Values of the YAML type a config field of ``annotation`` accepts (not necessarily in its range)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([st.none() if a is type(None) else value_of(a) for a in args])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(value_of(args[0]), max_size=4)
    if origin is tuple:
        return st.tuples(*map(value_of, args)).map(list)
    if origin is list:
        return st.lists(value_of(args[0]), max_size=3)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-5, 600) | st.integers()
    if annotation is float:
        return finite_floats
    if annotation in (str, Path):
        return words
    if dataclasses.is_dataclass(annotation):  # a sub-section: drawn on its own in raw_configs
        return st.just({})
    raise AssertionError(f"no strategy for {annotation!r}")


@st.composite
def raw_configs(draw) -> dict[str, dict[str, Any]]:
    """pipeline.yaml content: a few random fields of a few random sections and sub-sections."""
    raw: dict[str, dict[str, Any]] = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), min_size=1, max_size=3, unique=True)):
        for name in draw(st.lists(st.sampled_from(sorted(HINTS[section])), min_size=1, max_size=3, unique=True)):
            merge(raw, nested(section, {name: draw(value_of(HINTS[section][name]))}))
    return raw


def load_text(text: str) -> PipelineCfg:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pipeline.yaml"
        path.write_text(text)
        return load_config(path)


@MODEST
@given(raw_configs())
def test_config_round_trips_through_its_dump(raw):
    try:
        cfg = load_text(yaml.safe_dump(raw))
    except ConfigError:
        assume(False)  # outside a field's allowed range: its own tests cover the message
    assert load_text(dump_yaml(cfg)) == cfg


@MODEST
@given(st.sampled_from(SECTIONS) | st.none(), st.text(st.sampled_from("abcdefgh_"), min_size=1, max_size=10),
       raw_configs())
def test_unknown_keys_are_always_rejected(section, key, raw):
    allowed = {name for name in SECTIONS if "." not in name} if section is None else set(HINTS[section])
    assume(key not in allowed)
    try:
        build(PipelineCfg, raw, prefix="")
    except ConfigError:
        assume(False)  # an otherwise valid config, so that the unknown key is what gets reported
    if section is None:
        raw[key] = {}
    else:
        merge(raw, nested(section, {key: 1}))
    where = key if section is None else f"{section}.{key}"
    with pytest.raises(ConfigError, match=f"unknown key '{where}'"):
        build(PipelineCfg, raw, prefix="")


def wrong_values(annotation) -> list:
    """YAML values of another type than ``annotation`` accepts."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return ["not-one-of-them", {"a": 1}]
    if origin in (typing.Union, types.UnionType):
        return [v for v in wrong_values([a for a in args if a is not type(None)][0]) if v is not None]
    if origin in (tuple, list):
        return [5, "text", {"a": 1}]
    if dataclasses.is_dataclass(annotation):  # a sub-section takes a mapping
        return [5, "text", [1]]
    return {bool: [1, "yes", [True]], int: [1.5, "3", True, [1]], float: ["fast", True, [0.5]],
            str: [3, True, ["a"]], Path: [3, True, ["a"]]}[annotation]


@MODEST
@given(st.data())
def test_mistyped_values_are_always_rejected(data):
    section = data.draw(st.sampled_from(SECTIONS))
    name = data.draw(st.sampled_from(sorted(HINTS[section])))
    value = data.draw(st.sampled_from(wrong_values(HINTS[section][name])))
    with pytest.raises(ConfigError, match=f"{section}.{name}"):
        build(PipelineCfg, nested(section, {name: value}), prefix="")


FLOAT_FIELDS = sorted((section, name) for section in SECTIONS for name, hint in HINTS[section].items()
                      if hint is float or float in typing.get_args(hint))


@MODEST
@given(st.sampled_from(FLOAT_FIELDS), st.sampled_from([math.nan, math.inf, -math.inf, "nan", "-inf"]))
def test_non_finite_numbers_are_always_rejected(field, value):
    section, name = field
    with pytest.raises(ConfigError, match=f"{section}.{name} = .* must be a finite number"):
        build(PipelineCfg, nested(section, {name: value}), prefix="")


# ---------------------------------------------------------------------------------------------------------------
# Artifact keys

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=12,
)
params = st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=5)


def reordered(value, rotation: int):
    """The same value with every dict's keys in another insertion order."""
    if isinstance(value, dict):
        items = list(value.items())
        items = items[rotation % len(items):] + items[: rotation % len(items)] if items else items
        return {key: reordered(item, rotation + 1) for key, item in reversed(items)}
    if isinstance(value, list):
        return [reordered(item, rotation) for item in value]
    return value


def leaf_paths(value, prefix=()):
    if isinstance(value, dict) and value:
        return [path for key, item in value.items() for path in leaf_paths(item, (*prefix, key))]
    if isinstance(value, list) and value:
        return [path for index, item in enumerate(value) for path in leaf_paths(item, (*prefix, index))]
    return [prefix]


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@MODEST
@given(params, st.dictionaries(st.text(max_size=6), st.text(max_size=20), max_size=3), st.integers(0, 7))
def test_key_does_not_depend_on_dict_order(parameters, inputs, rotation):
    spec = ArtifactSpec("stage", 1, parameters, inputs)
    again = ArtifactSpec("stage", 1, reordered(parameters, rotation), reordered(inputs, rotation))
    assert spec.key == again.key


@MODEST
@given(params, st.data())
def test_key_changes_when_any_parameter_changes(parameters, data):
    path = data.draw(st.sampled_from(leaf_paths(parameters)))
    old = parameters
    for step in path:
        old = old[step]
    new = data.draw(json_values.filter(lambda v: yaml.safe_dump(v) != yaml.safe_dump(old) and v != old))
    changed = replaced(parameters, path, new)
    assume(changed != parameters)
    assert ArtifactSpec("stage", 1, changed).key != ArtifactSpec("stage", 1, parameters).key
    assert ArtifactSpec("stage", 2, parameters).key != ArtifactSpec("stage", 1, parameters).key
    assert ArtifactSpec("stage", 1, parameters, {"x": "a"}).key != ArtifactSpec("stage", 1, parameters).key


# ---------------------------------------------------------------------------------------------------------------
# Geometry conventions

quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).map(
    lambda q: torch.tensor(q, dtype=torch.float64)).filter(lambda q: q.norm() > 1e-3)


def rigid(quaternion: torch.Tensor, translation) -> torch.Tensor:
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3] = quaternion_to_rotation_matrix(quaternion)
    transform[:3, 3] = torch.tensor(translation, dtype=torch.float64)
    return transform


@st.composite
def cameras(draw) -> Camera:
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    fx, fy = draw(st.floats(5, 5000)), draw(st.floats(5, 5000))
    cx, cy = draw(st.floats(0.01, 0.99)) * width, draw(st.floats(0.01, 0.99)) * height
    K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64)
    translation = draw(st.lists(st.floats(-50, 50), min_size=3, max_size=3))
    return Camera(K[None], rigid(draw(quaternions), translation)[None], height, width)


@MODEST
@given(cameras(), st.data())
def test_unprojected_pixels_project_back_onto_their_centres(camera, data):
    depth = torch.tensor(data.draw(st.lists(st.floats(0.05, 200), min_size=camera.height * camera.width,
                                            max_size=camera.height * camera.width)), dtype=torch.float64)
    depth = depth.reshape(1, camera.height, camera.width)
    points = unproject_depth(depth, camera)  # [1, H, W, 3]
    uv, z = project_points(points.reshape(1, -1, 3), camera)
    centres = pixel_centers(camera.height, camera.width, dtype=torch.float64).reshape(1, -1, 2)
    torch.testing.assert_close(uv, centres, rtol=0, atol=1e-6)
    torch.testing.assert_close(z, depth.reshape(1, -1), rtol=1e-9, atol=1e-9)


@MODEST
@given(quaternions, st.floats(0.01, 100))
def test_quaternion_and_rotation_round_trip_in_wxyz(quaternion, scale):
    rotation = quaternion_to_rotation_matrix(quaternion)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.det(rotation).item() == pytest.approx(1.0, abs=1e-12)
    check_rigid(rigid(quaternion, [0, 0, 0]).numpy(), "a rotation from a quaternion")
    # q, -q and any positive multiple are the same rotation
    torch.testing.assert_close(quaternion_to_rotation_matrix(-quaternion), rotation, rtol=0, atol=1e-12)
    torch.testing.assert_close(quaternion_to_rotation_matrix(quaternion * scale), rotation, rtol=0, atol=1e-12)
    back = rotation_matrix_to_quaternion(rotation)
    assert back.norm().item() == pytest.approx(1.0, abs=1e-12) and back[0] >= 0
    unit = quaternion / quaternion.norm()
    # w >= 0 picks one of q and -q; at w = 0 (half turns) both qualify
    assert min((back - unit).abs().max(), (back + unit).abs().max()) < 1e-9, (back, unit)


@MODEST
@given(st.floats(-math.pi, math.pi), st.sampled_from([0, 1, 2]))
def test_quaternions_are_scalar_first(angle, axis):
    # (cos a/2, sin a/2 * e_axis) in wxyz turns by `angle` about `axis`, counter-clockwise (right-handed)
    quaternion = torch.zeros(4, dtype=torch.float64)
    quaternion[0], quaternion[1 + axis] = math.cos(angle / 2), math.sin(angle / 2)
    rotation = quaternion_to_rotation_matrix(quaternion)
    first, second = (axis + 1) % 3, (axis + 2) % 3
    expected = torch.eye(3, dtype=torch.float64)
    expected[first, first] = expected[second, second] = math.cos(angle)
    expected[second, first], expected[first, second] = math.sin(angle), -math.sin(angle)
    torch.testing.assert_close(rotation, expected, rtol=0, atol=1e-12)
