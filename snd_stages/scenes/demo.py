"""Synthetic indoor RGB-D scenes: the embedded default dataset.

Each scene is a closed box room (floor, ceiling and four walls, each its own instance) furnished with pieces
assembled from primitives (tables with legs, chairs, cabinets, shelves, a bed or a sofa, lamps, plants, a door,
pictures, a rug) and small objects on tables, cabinets, shelf boards and the floor. Surfaces carry
scikit-image's bundled images through triplanar mapping in their object's frame and are lit by view-independent
Lambertian shading (hemispherical ambient, a shadow-casting point light under the ceiling, a directional fill),
so a surface point has the same colour in every frame. A hand-held-like camera follows an arc of a perturbed
ellipse through free space, looking across the room. Open3D's raycaster renders colour (two samples per pixel)
and, from the pixel-centre ray, z-depth, camera-frame normals, instance and semantic labels.

World frame: z up, floor at z = 0, the room spans [0, Lx] x [0, Ly] x [0, Lz]. Cameras follow
:mod:`snd_stages.geometry` (OpenCV, world-to-camera, pixel (i, j) centred at (j + 0.5, i + 0.5)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d
import skimage.data
from PIL import Image

from .raycast import pixel_rays

SEMANTIC_CLASSES: tuple[str, ...] = (
    "wall", "floor", "ceiling", "door", "picture", "rug", "table", "chair", "cabinet", "shelf",
    "bed", "sofa", "lamp", "plant", "box", "ball", "vase", "cone", "ring",
)
_CLASS_ID = {name: index for index, name in enumerate(SEMANTIC_CLASSES)}
_SMALL_CLASSES = ("box", "ball", "vase", "cone", "ring")

_TEXTURE_SIZE = 128
_GRAY_TEXTURES = ("brick", "grass", "gravel", "moon", "camera", "coins", "text", "page", "cell", "checkerboard",
                  "clock")
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
_WOOD = ((0.62, 0.42, 0.25), (0.78, 0.6, 0.4), (0.45, 0.3, 0.2), (0.86, 0.74, 0.54))
_FABRIC = ((0.6, 0.22, 0.2), (0.22, 0.36, 0.58), (0.3, 0.52, 0.36), (0.74, 0.62, 0.42), (0.52, 0.52, 0.56),
           (0.84, 0.48, 0.2), (0.46, 0.3, 0.56), (0.85, 0.8, 0.72))
_PAINT = ((0.93, 0.91, 0.86), (0.84, 0.88, 0.93), (0.92, 0.85, 0.74), (0.8, 0.86, 0.78), (0.95, 0.9, 0.9))
_METAL = ((0.25, 0.25, 0.27), (0.75, 0.65, 0.35))

_WALL_MARGIN = 0.55  # camera centres stay this far (metres) from the walls ...
_OBSTACLE_MARGIN = 0.4  # ... and from furniture footprints
_MAX_LAYOUT_ATTEMPTS = 50
_MAX_PATH_ATTEMPTS = 200
_MAX_TURN_PER_FRAME = np.deg2rad(6.0)
# Colour samples per pixel, offsets from its centre in pixels: two diagonal samples anti-alias at half the cost
# of a 2x2 grid. Depth, normals and labels come from the centre ray.
_SUBPIXEL_OFFSETS = ((-0.25, -0.25), (0.25, 0.25))


@dataclass(frozen=True)
class DemoScene:
    """A rendered scene; ``F`` frames of ``H`` x ``W`` pixels.

    Attributes:
        images: ``[F, H, W, 3]`` uint8 RGB.
        depth: ``[F, H, W]`` float32 metric z-depth, positive everywhere (the room is closed).
        normals: ``[F, H, W, 3]`` float32 unit normals in the OpenCV camera frame, facing the camera.
        instances: ``[F, H, W]`` int32 instance ids >= 1; an object has the same id in every frame. Ids 1-6 are
            the floor, the ceiling and the four walls.
        semantics: ``[F, H, W]`` int32 indices into :data:`SEMANTIC_CLASSES`.
        intrinsics: ``[3, 3]`` float64 K in pixels, shared by all frames; the principal point is off-centre.
        world_to_camera: ``[F, 4, 4]`` float64 rigid OpenCV world-to-camera transforms.
    """

    images: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    instances: np.ndarray
    semantics: np.ndarray
    intrinsics: np.ndarray
    world_to_camera: np.ndarray


@dataclass(frozen=True)
class _Material:
    """Albedo = tint * (1 - contrast + contrast * texture); the texture repeats (mirrored) every ``scale``."""

    texture: int
    tint: np.ndarray  # [3]
    contrast: float
    scale: np.ndarray  # [3] metres per texture repeat along the object's local x, y, z
    origin: np.ndarray  # [3] local point at the texture's corner


_Part = tuple[np.ndarray, np.ndarray, _Material]  # vertices [V, 3] in the object's frame, triangles [T, 3]


@dataclass
class _Object:
    """One instance, its parts in a local frame: x along its width, y towards its front, z up, origin on the floor."""

    class_name: str
    parts: list[_Part]
    size: tuple[float, float, float]  # footprint width, depth and height
    supports: list[tuple[float, ...]] = field(default_factory=list)  # (x, y, z, half width, half depth, headroom)
    yaw: float = 0.0
    position: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def footprint(self) -> np.ndarray:
        """``[4]`` world (xmin, ymin, xmax, ymax) bounding the rotated footprint."""
        c, s = abs(np.cos(self.yaw)), abs(np.sin(self.yaw))
        half = np.array([c * self.size[0] + s * self.size[1], s * self.size[0] + c * self.size[1]]) / 2
        return np.concatenate([self.position[:2] - half, self.position[:2] + half])

    def to_world(self, local: np.ndarray) -> np.ndarray:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return local @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + self.position


def _mesh(geometry: o3d.geometry.TriangleMesh, offset, material: _Material) -> _Part:
    vertices = np.asarray(geometry.vertices) + np.asarray(offset, dtype=np.float64)
    return vertices, np.asarray(geometry.triangles), material


def _box(lo, hi, material: _Material) -> _Part:
    lo = np.asarray(lo, dtype=np.float64)
    return _mesh(o3d.geometry.TriangleMesh.create_box(*(np.asarray(hi) - lo)), lo, material)


def _cylinder(z0: float, z1: float, radius: float, material: _Material) -> _Part:
    return _mesh(o3d.geometry.TriangleMesh.create_cylinder(radius, z1 - z0, 20, 1), (0, 0, (z0 + z1) / 2), material)


def _sphere(centre, radius: float, material: _Material) -> _Part:
    return _mesh(o3d.geometry.TriangleMesh.create_sphere(radius, 16), centre, material)


def _cone(z0: float, radius: float, height: float, material: _Material) -> _Part:
    return _mesh(o3d.geometry.TriangleMesh.create_cone(radius, height, 20, 1), (0, 0, z0), material)


def _legs(half_x: float, half_y: float, thickness: float, height: float, material: _Material) -> list[_Part]:
    t, corners = thickness / 2, [(x, y) for x in (-half_x, half_x) for y in (-half_y, half_y)]
    return [_box((x - t, y - t, 0), (x + t, y + t, height), material) for x, y in corners]


class _Palette:
    """Seeded material choices."""

    def __init__(self, rng: np.random.Generator, texture_index: dict[str, int]):
        self.rng, self.index = rng, texture_index

    def make(self, names, tints, contrast, scale, origin=None) -> _Material:
        tint = np.asarray(tints[self.rng.integers(len(tints))]) * self.rng.uniform(0.9, 1.1, 3)
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (3,))
        phase = self.rng.uniform(0, 2, 3) * scale  # where the repeats start, so that equal objects differ
        origin = phase if origin is None else np.broadcast_to(np.asarray(origin, dtype=np.float64), (3,))
        return _Material(self.index[names[self.rng.integers(len(names))]], np.clip(tint, 0, 1),
                         self.rng.uniform(*contrast), scale, origin)

    def wood(self) -> _Material:  # stones stretched along x read as grain
        return self.make(("gravel", "grass"), _WOOD, (0.35, 0.55), (self.rng.uniform(1.0, 2.0), 0.12, 0.12))

    def fabric(self) -> _Material:
        return self.make(("gravel", "grass", "cell", "coins"), _FABRIC, (0.25, 0.45), self.rng.uniform(0.25, 0.6))

    def paint(self, tints=_PAINT) -> _Material:
        return self.make(("moon", "gravel"), tints, (0.08, 0.2), 1.5)

    def pattern(self) -> _Material:
        names = ("checkerboard", "brick", "text", "page", "clock", "camera", "coins")
        return self.make(names, _FABRIC + _PAINT, (0.5, 0.8), self.rng.uniform(0.15, 0.5))

    def photo(self, origin, size) -> _Material:
        return self.make(_PHOTOS, ((1.0, 1.0, 1.0),), (1.0, 1.0), size, origin)

    def small_object(self) -> _Material:
        return (self.pattern, self.fabric, lambda: self.photo(None, 0.3))[self.rng.integers(3)]()


def _table(rng, palette):
    w, d, h = rng.uniform(1.0, 1.6), rng.uniform(0.7, 0.9), rng.uniform(0.72, 0.78)
    legs = palette.wood() if rng.random() < 0.5 else palette.paint(_METAL[:1])
    parts = [_box((-w / 2, -d / 2, h - 0.04), (w / 2, d / 2, h), palette.wood())]
    return _Object("table", parts + _legs(w / 2 - 0.08, d / 2 - 0.08, 0.06, h - 0.04, legs), (w, d, h),
                   [(0, 0, h, w / 2 - 0.05, d / 2 - 0.05, 0.5)])


def _chair(rng, palette):  # faces +y
    side, back = rng.uniform(0.42, 0.5), rng.uniform(0.4, 0.5)
    frame, seat = palette.wood(), palette.fabric() if rng.random() < 0.5 else palette.wood()
    parts = [_box((-side / 2, -side / 2, 0.42), (side / 2, side / 2, 0.47), seat),
             _box((-side / 2, -side / 2, 0.47), (side / 2, -side / 2 + 0.04, 0.47 + back), frame)]
    parts += _legs(side / 2 - 0.03, side / 2 - 0.03, 0.04, 0.42, frame)
    return _Object("chair", parts, (side, side, 0.47 + back))


def _cabinet(rng, palette):
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.55), rng.uniform(0.7, 1.0)
    body, knob = palette.paint() if rng.random() < 0.5 else palette.wood(), palette.paint(_METAL)
    parts = [_box((-w / 2, -d / 2, 0), (w / 2, d / 2, h - 0.03), body),
             _box((-w / 2 - 0.01, -d / 2, h - 0.03), (w / 2 + 0.01, d / 2 + 0.01, h), palette.wood())]
    parts += [_sphere((x, d / 2 + 0.01, 0.65 * h), 0.025, knob) for x in (-w / 4, w / 4)]
    return _Object("cabinet", parts, (w, d, h), [(0, 0, h, w / 2 - 0.05, d / 2 - 0.05, 0.5)])


def _shelf(rng, palette):
    w, d, h = rng.uniform(0.8, 1.2), rng.uniform(0.3, 0.4), rng.uniform(1.6, 2.0)
    wood, levels = palette.wood(), np.linspace(0.05, h - 0.03, rng.integers(4, 6))
    parts = [_box((-w / 2, -d / 2, 0), (w / 2, -d / 2 + 0.02, h), palette.paint())]
    parts += [_box((x, -d / 2, 0), (x + 0.03, d / 2, h), wood) for x in (-w / 2, w / 2 - 0.03)]
    parts += [_box((-w / 2 + 0.03, -d / 2 + 0.02, z), (w / 2 - 0.03, d / 2, z + 0.03), wood) for z in levels]
    headroom = levels[1] - levels[0] - 0.06
    supports = [(0, 0.01, z + 0.03, w / 2 - 0.05, d / 2 - 0.04, headroom) for z in levels[:-1]]
    return _Object("shelf", parts, (w, d, h), supports)


def _bed(rng, palette):  # headboard at the back
    w, d, head = rng.uniform(1.4, 1.8), rng.uniform(2.0, 2.15), rng.uniform(0.9, 1.1)
    wood, linen = palette.wood(), palette.paint()
    parts = [_box((-w / 2, -d / 2, 0), (w / 2, d / 2, 0.3), wood),
             _box((-w / 2, -d / 2, 0), (w / 2, -d / 2 + 0.06, head), wood),
             _box((-w / 2 + 0.03, -d / 2 + 0.06, 0.3), (w / 2 - 0.03, d / 2 - 0.03, 0.5), linen),
             _box((-w / 2 + 0.01, -d / 2 + 0.75, 0.3), (w / 2 - 0.01, d / 2 - 0.01, 0.54), palette.fabric()),
             _box((-w / 2 + 0.15, -d / 2 + 0.12, 0.5), (w / 2 - 0.15, -d / 2 + 0.5, 0.62), linen)]
    return _Object("bed", parts, (w, d, head))


def _sofa(rng, palette):
    w, d, cover = rng.uniform(1.6, 2.2), rng.uniform(0.8, 0.95), palette.fabric()
    parts = [_box((-w / 2 + 0.15, -d / 2 + 0.2, 0), (w / 2 - 0.15, d / 2, 0.42), cover),
             _box((-w / 2, -d / 2, 0), (w / 2, -d / 2 + 0.2, 0.85), cover)]
    parts += [_box((x, -d / 2, 0), (x + 0.15, d / 2, 0.6), cover) for x in (-w / 2, w / 2 - 0.15)]
    return _Object("sofa", parts, (w, d, 0.85))


def _lamp(rng, palette):
    metal, radius, top = palette.paint(_METAL), rng.uniform(0.16, 0.22), rng.uniform(1.5, 1.7)
    parts = [_cylinder(0, 0.03, 0.14, metal), _cylinder(0.03, top - 0.2, 0.015, metal),
             _cylinder(top - 0.25, top, radius, palette.paint(((0.95, 0.9, 0.75), (0.9, 0.85, 0.85))))]
    return _Object("lamp", parts, (2 * radius, 2 * radius, top))


def _plant(rng, palette):
    pot_radius, pot_height, leaves = rng.uniform(0.13, 0.2), rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.38)
    foliage = palette.make(("grass",), ((0.25, 0.5, 0.2), (0.35, 0.55, 0.25)), (0.6, 0.8), 0.3)
    pot = palette.make(("gravel", "coins"), ((0.7, 0.4, 0.28), (0.85, 0.85, 0.85)), (0.3, 0.5), 0.3)
    crown = (_sphere((0, 0, pot_height + 0.8 * leaves), leaves, foliage) if rng.random() < 0.5
             else _cone(pot_height, leaves, 3.5 * leaves, foliage))
    parts = [_cylinder(0, pot_height, pot_radius, pot), crown]
    return _Object("plant", parts, (2 * leaves, 2 * leaves, pot_height + 3.5 * leaves))


def _door(rng, palette):
    w, h = rng.uniform(0.85, 0.95), rng.uniform(2.0, 2.1)
    parts = [_box((-w / 2, -0.02, 0), (w / 2, 0.02, h), palette.wood()),
             _sphere((w / 2 - 0.1, 0.05, 1.0), 0.03, palette.paint(_METAL[1:]))]
    return _Object("door", parts, (w, 0.04, h))


def _picture(rng, palette):  # origin at the bottom centre of the image, hung by its position's height
    w, h = rng.uniform(0.4, 1.0), rng.uniform(0.35, 0.8)
    frame = palette.paint(((0.15, 0.12, 0.1), (0.85, 0.8, 0.7), (0.6, 0.45, 0.25)))
    parts = [_box((-w / 2 - 0.04, -0.015, -0.04), (w / 2 + 0.04, 0.015, h + 0.04), frame),
             _box((-w / 2, -0.015, 0), (w / 2, 0.02, h), palette.photo((-w / 2, -0.015, 0), (w, 0.035, h)))]
    return _Object("picture", parts, (w + 0.08, 0.035, h))


def _rug(rng, palette):
    w, d = rng.uniform(1.4, 2.4), rng.uniform(1.0, 1.7)
    names = ("checkerboard", "immunohistochemistry", "colorwheel", "coins", "brick")
    material = palette.make(names, _FABRIC, (0.5, 0.8), (w / 2, d / 2, 1.0), (-w / 2, -d / 2, 0))  # symmetric pattern
    return _Object("rug", [_box((-w / 2, -d / 2, 0), (w / 2, d / 2, 0.012), material)], (w, d, 0.012))


def _small_object(rng, palette) -> tuple[_Object, float]:
    """A small primitive object and its footprint radius."""
    kind, material = _SMALL_CLASSES[rng.integers(len(_SMALL_CLASSES))], palette.small_object()
    if kind == "box":
        w, d, height = rng.uniform(0.1, 0.32, 3)
        part, radius = _box((-w / 2, -d / 2, 0), (w / 2, d / 2, height), material), np.hypot(w, d) / 2
    elif kind == "ball":
        radius = rng.uniform(0.06, 0.14)
        part, height = _sphere((0, 0, radius), radius, material), 2 * radius
    elif kind == "vase":
        radius, height = rng.uniform(0.04, 0.09), rng.uniform(0.15, 0.35)
        part = _cylinder(0, height, radius, material)
    elif kind == "cone":
        radius, height = rng.uniform(0.05, 0.12), rng.uniform(0.15, 0.35)
        part = _cone(0, radius, height, material)
    else:
        ring, tube = rng.uniform(0.07, 0.13), rng.uniform(0.025, 0.04)
        part = _mesh(o3d.geometry.TriangleMesh.create_torus(ring, tube, 20, 10), (0, 0, tube), material)
        radius, height = ring + tube, 2 * tube
    return _Object(kind, [part], (2 * radius, 2 * radius, height), yaw=rng.uniform(0, 2 * np.pi)), radius


def _overlaps(rect: np.ndarray, others: list[np.ndarray], gap: float) -> bool:
    return any((rect[:2] < other[2:] + gap).all() and (other[:2] < rect[2:] + gap).all() for other in others)


def _against_wall(rng, room, obj: _Object, occupied: list, height: float = 0.0, gap: float = 0.02) -> bool:
    """Put ``obj`` with its back to a random wall, ``height`` above the floor, overlapping nothing in ``occupied``."""
    lx, ly = room[:2]
    width, depth = obj.size[:2]
    for _ in range(40):
        wall = int(rng.integers(4))
        along = lx if wall % 2 == 0 else ly
        if width + 0.2 > along:
            continue
        s, inset = rng.uniform(0.1 + width / 2, along - 0.1 - width / 2), gap + depth / 2
        # Walls y = 0, x = Lx, y = Ly, x = 0; the yaw turns the object's front (+y) towards the room.
        obj.position = np.array([(s, inset), (lx - inset, s), (lx - s, ly - inset), (inset, ly - s)][wall] + (height,))
        obj.yaw = wall * np.pi / 2
        if not _overlaps(obj.footprint(), occupied, 0.1):
            occupied.append(obj.footprint())
            return True
    return False


def _furnish(rng, room, palette) -> tuple[list[_Object], list[np.ndarray]]:
    """Furniture, wall decoration and small objects, and the footprints the camera must keep away from."""
    lx, ly = room[:2]
    occupied, obstacles, placed = [], [], []

    def add(obj: _Object, obstacle: bool = True) -> bool:
        if not _against_wall(rng, room, obj, occupied):
            return False
        placed.append(obj)
        if obstacle:
            obstacles.append(occupied[-1])
        return True

    def add_chair(chair: _Object, table_footprint: np.ndarray) -> None:  # may touch its table, nothing else
        if not _overlaps(chair.footprint(), [rect for rect in occupied if rect is not table_footprint], 0.0):
            placed.append(chair)
            occupied.append(chair.footprint())
            obstacles.append(chair.footprint())

    door = _door(rng, palette)
    if add(door, obstacle=False):  # and keep the floor in front of it clear
        occupied.append(np.concatenate([door.position[:2] - 0.5, door.position[:2] + 0.5]))
    big = [_bed, _sofa] if rng.random() < 0.5 else [_sofa, _bed]
    for build in big[: 1 + int(min(lx, ly) > 5.5 and rng.random() < 0.5)] + [_shelf, _cabinet, _lamp, _plant]:
        add(build(rng, palette))
    for build in rng.choice((_cabinet, _plant, _lamp, _shelf, _chair), int(rng.integers(2, 5) + (lx + ly - 8) // 2)):
        add(build(rng, palette))  # larger rooms get more
    table = _table(rng, palette)
    if min(lx, ly) > 5.0 and rng.random() < 0.7:  # a dining group in the middle of the room
        table.yaw = rng.integers(4) * np.pi / 2 + rng.uniform(-0.2, 0.2)
        table.position = np.array([lx / 2 + rng.uniform(-0.4, 0.4), ly / 2 + rng.uniform(-0.4, 0.4), 0.0])
        if not _overlaps(table.footprint(), occupied, 0.2):
            placed.append(table)
            occupied.append(table.footprint())
            obstacles.append(occupied[-1])
            table_footprint = occupied[-1]
            for side in rng.permutation(4)[: rng.integers(2, 5)]:
                reach, angle = (table.size[1] if side % 2 == 0 else table.size[0]) / 2 + 0.3, side * np.pi / 2
                chair = _chair(rng, palette)
                chair.yaw = table.yaw + angle  # facing the table
                chair.position = table.to_world(np.array([[reach * np.sin(angle), -reach * np.cos(angle), 0]]))[0]
                add_chair(chair, table_footprint)
    elif add(table):
        table_footprint = occupied[-1]
        for offset in rng.permutation([-0.3, 0.3])[: rng.integers(1, 3)]:
            chair = _chair(rng, palette)
            chair.yaw = table.yaw + np.pi  # facing the table and the wall behind it
            chair.position = table.to_world(np.array([[offset * table.size[0], table.size[1] / 2 + 0.25, 0]]))[0]
            add_chair(chair, table_footprint)
    if rng.random() < 0.7:
        rug = _rug(rng, palette)
        rug.yaw = rng.integers(2) * np.pi / 2
        rug.position = np.array([lx / 2 + rng.uniform(-0.5, 0.5), ly / 2 + rng.uniform(-0.5, 0.5), 0.0])
        placed.append(rug)
    tall = [obj.footprint() for obj in placed if obj.size[2] > 1.0]  # pictures hang above everything else
    for _ in range(int(rng.integers(2, 5))):
        picture = _picture(rng, palette)
        if _against_wall(rng, room, picture, tall, rng.uniform(1.15, max(1.2, 1.95 - picture.size[2])), gap=0.0):
            placed.append(picture)
    supports = [(obj, support) for obj in placed for support in obj.supports]
    for _ in range(int(rng.integers(5, 9))):
        small, radius = _small_object(rng, palette)
        if not supports or rng.random() < 0.15:
            add(small)
            continue
        owner, (x, y, z, half_x, half_y, headroom) = supports[rng.integers(len(supports))]
        if small.size[2] > headroom or half_x < radius or half_y < radius:
            continue
        local = np.array([[x + rng.uniform(-1, 1) * (half_x - radius), y + rng.uniform(-1, 1) * (half_y - radius), z]])
        small.position = owner.to_world(local)[0]
        if not any(np.hypot(*(small.position[:2] - other.position[:2])) < radius + other.size[0] / 2 + 0.03
                   for other in placed if other.class_name in _SMALL_CLASSES):
            placed.append(small)
    return placed, obstacles


def _room(room, palette) -> list[_Object]:
    """Floor, ceiling and four walls, facing inwards."""
    lx, ly, lz = room
    wall = palette.make(("brick", "gravel", "moon"), _PAINT, (0.25, 0.5), palette.rng.uniform(1.0, 1.8))
    floor = (palette.make(("gravel", "grass"), _WOOD, (0.35, 0.55), (2.0, 0.25, 1.0)),  # planks
             palette.make(("checkerboard",), _PAINT + _WOOD, (0.3, 0.5), palette.rng.uniform(1.2, 2.0)),  # tiles
             palette.make(("grass", "gravel"), _FABRIC, (0.3, 0.5), 0.8))[palette.rng.integers(3)]  # carpet
    quads = [("floor", (0, 0, 0), (lx, 0, 0), (0, ly, 0), floor),
             ("ceiling", (0, 0, lz), (0, ly, 0), (lx, 0, 0), palette.paint()),
             ("wall", (0, 0, 0), (0, 0, lz), (lx, 0, 0), wall), ("wall", (lx, 0, 0), (0, 0, lz), (0, ly, 0), wall),
             ("wall", (0, ly, 0), (lx, 0, 0), (0, 0, lz), wall), ("wall", (0, 0, 0), (0, ly, 0), (0, 0, lz), wall)]
    objects = []
    for name, corner, edge_u, edge_v, material in quads:  # the quad faces edge_u x edge_v
        corner, edge_u, edge_v = (np.asarray(a, dtype=np.float64) for a in (corner, edge_u, edge_v))
        vertices = np.stack([corner, corner + edge_u, corner + edge_u + edge_v, corner + edge_v])
        objects.append(_Object(name, [(vertices, np.array([[0, 1, 2], [0, 2, 3]]), material)], room))
    return objects


def _clear(points: np.ndarray, room, obstacles: np.ndarray) -> bool:
    """Whether every ``[N, 2]`` point keeps its distance from the walls and the obstacle rectangles ``[M, 4]``."""
    x, y = points[:, 0], points[:, 1]
    inside = (x > _WALL_MARGIN) & (x < room[0] - _WALL_MARGIN) & (y > _WALL_MARGIN) & (y < room[1] - _WALL_MARGIN)
    if not inside.all():
        return False
    dx = np.maximum(np.maximum(obstacles[None, :, 0] - x[:, None], x[:, None] - obstacles[None, :, 2]), 0)
    dy = np.maximum(np.maximum(obstacles[None, :, 1] - y[:, None], y[:, None] - obstacles[None, :, 3]), 0)
    return bool((np.hypot(dx, dy) >= _OBSTACLE_MARGIN).all())


def _camera_path(rng, room, obstacles: np.ndarray, frames: int) -> np.ndarray | None:
    """``[F, 4, 4]`` world-to-camera poses along an arc of a perturbed ellipse in free space, or None."""
    lx, ly = room[:2]
    step = rng.uniform(0.05, 0.1)
    length = step * max(frames - 1, 1)
    for attempt in range(_MAX_PATH_ATTEMPTS):
        # Orbits around the middle of the room see the most furniture; off-centre ones are the fallback.
        spread = (0.1 + 0.4 * attempt / _MAX_PATH_ATTEMPTS) * np.array([lx, ly])
        centre = np.clip(np.array([lx, ly]) / 2 + rng.uniform(-spread, spread), 1.2, [lx - 1.2, ly - 1.2])
        radii = rng.uniform(1.0, [max(1.0, min(2.2, lx / 2 - 0.5)), max(1.0, min(2.2, ly / 2 - 0.5))])
        phase, direction = rng.uniform(0, 2 * np.pi, 8), rng.choice([-1.0, 1.0])
        height, pitch = rng.uniform(1.33, 1.67), -np.deg2rad(rng.uniform(10, 20))
        sweep = np.deg2rad(rng.uniform(15, 35))

        def at(theta):  # camera centres, yaw, pitch and roll: smooth functions of the orbit angle
            radial = 1 + 0.08 * np.sin(2 * theta + phase[1]) + 0.05 * np.sin(3 * theta + phase[2])
            xy = centre + radii * radial[:, None] * np.stack([np.cos(theta), np.sin(theta)], -1)
            z = height + 0.08 * np.sin(theta + phase[3]) + 0.05 * np.sin(2.3 * theta + phase[4])
            # Looking across the orbit's centre, sweeping left and right to take in more of the room.
            yaw = np.arctan2(centre[1] - xy[:, 1], centre[0] - xy[:, 0]) + sweep * np.sin(1.5 * theta + phase[5])
            return (np.concatenate([xy, z[:, None]], -1), yaw, pitch + np.deg2rad(5) * np.sin(0.8 * theta + phase[6]),
                    np.deg2rad(2) * np.sin(1.3 * theta + phase[7]))

        # Enough turns for the whole length (the radial factor is >= 0.87): long sequences circle repeatedly.
        turns = 1 + int(np.ceil(length / (2 * np.pi * 0.85 * radii.min())))
        dense_theta = phase[0] + direction * np.linspace(0, 2 * np.pi * turns, 1024 * turns)
        dense = at(dense_theta)[0]
        arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=-1))])
        if not _clear(dense[arc <= length + 0.01], room, obstacles):
            continue
        centres, yaw, pitches, rolls = at(np.interp(np.arange(frames) * step, arc, dense_theta))
        forward = np.stack([np.cos(pitches) * np.cos(yaw), np.cos(pitches) * np.sin(yaw), np.sin(pitches)], -1)
        if frames > 1 and np.arccos(np.clip((forward[1:] * forward[:-1]).sum(-1), -1, 1)).max() > _MAX_TURN_PER_FRAME:
            continue
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right, axis=-1, keepdims=True)
        down = np.cross(forward, right)
        cos_roll, sin_roll = np.cos(rolls)[:, None], np.sin(rolls)[:, None]
        right, down = cos_roll * right + sin_roll * down, cos_roll * down - sin_roll * right
        world_to_camera = np.tile(np.eye(4), (frames, 1, 1))
        world_to_camera[:, :3, :3] = np.stack([right, down, forward], 1)  # rows: the camera axes in world
        world_to_camera[:, :3, 3] = -np.einsum("fij,fj->fi", world_to_camera[:, :3, :3], centres)
        return world_to_camera
    return None


def _texture_bank() -> tuple[dict[str, int], np.ndarray]:
    """``[T, S, S, 3]`` float32 textures in [0, 1]: square centre crops of scikit-image's bundled images."""
    names = _GRAY_TEXTURES + _PHOTOS
    bank = np.empty((len(names), _TEXTURE_SIZE, _TEXTURE_SIZE, 3), dtype=np.float32)
    for index, name in enumerate(names):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        bank[index] = np.asarray(square.resize((_TEXTURE_SIZE,) * 2, Image.Resampling.BOX), dtype=np.float32) / 255
    return {name: index for index, name in enumerate(names)}, bank


def _sample_texture(bank: np.ndarray, texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``[N, 3]`` bilinear lookups, mirrored repeat (seamless tiling); u right, v up, one repeat per unit."""
    size = bank.shape[1]
    x, y = u * size - 0.5, (1 - v) * size - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def mirrored(i):
        i = np.mod(i.astype(np.int32), 2 * size)
        return np.where(i >= size, 2 * size - 1 - i, i)

    flat, base = bank.reshape(-1, 3), texture.astype(np.int32) * (size * size)
    top, bottom = base + mirrored(y0) * size, base + mirrored(y0 + 1) * size
    left, right = mirrored(x0), mirrored(x0 + 1)
    return ((flat[top + left] * (1 - fx) + flat[top + right] * fx) * (1 - fy)
            + (flat[bottom + left] * (1 - fx) + flat[bottom + right] * fx) * fy)


class _Renderer:
    """All objects in one raycasting scene; a triangle's part gives its instance, class, frame and material."""

    def __init__(self, objects: list[_Object], bank: np.ndarray, light: np.ndarray):
        vertices, triangles, part_of_triangle, parts = [], [], [], []
        count = 0
        for instance, obj in enumerate(objects, start=1):
            for local_vertices, local_triangles, material in obj.parts:
                vertices.append(obj.to_world(local_vertices))
                triangles.append(local_triangles + count)
                part_of_triangle.append(np.full(len(local_triangles), len(parts)))
                parts.append((instance, _CLASS_ID[obj.class_name], obj.yaw, obj.position, material))
                count += len(local_vertices)
        self.raycaster = o3d.t.geometry.RaycastingScene()
        self.raycaster.add_triangles(o3d.core.Tensor(np.concatenate(vertices).astype(np.float32)),
                                     o3d.core.Tensor(np.concatenate(triangles).astype(np.uint32)))
        self.part_of_triangle = np.concatenate(part_of_triangle)
        self.instance = np.array([p[0] for p in parts], dtype=np.int32)
        self.semantic = np.array([p[1] for p in parts], dtype=np.int32)
        # One row per part, so that shading gathers everything with a single lookup: cos yaw, sin yaw,
        # position [2:5], texture origin [5:8], 1 / texture scale [8:11], tint [11:14], contrast, texture index.
        self.part_table = np.array([(np.cos(yaw), np.sin(yaw), *position, *material.origin, *1 / material.scale,
                                     *material.tint, material.contrast, material.texture)
                                    for _, _, yaw, position, material in parts], dtype=np.float32)
        self.bank, self.light = bank, light.astype(np.float32)

    def _cast(self, origins: np.ndarray, directions: np.ndarray) -> dict:
        rays = np.empty((len(directions), 6), dtype=np.float32)
        rays[:, :3], rays[:, 3:] = origins, directions
        return self.raycaster.cast_rays(o3d.core.Tensor(rays))

    def cast(self, origin: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hit distances in units of the directions' lengths, part indices, and unit normals on the outer side."""
        hit = self._cast(origin, directions)
        t_hit = hit["t_hit"].numpy()
        if not np.isfinite(t_hit).all():
            raise RuntimeError("a camera ray left the room; the room must be closed around every camera")
        return t_hit, self.part_of_triangle[hit["primitive_ids"].numpy()], hit["primitive_normals"].numpy()

    def shade(self, points: np.ndarray, part: np.ndarray, normals: np.ndarray) -> np.ndarray:
        """``[N, 3]`` RGB in [0, 1] of surface points: a function of the point alone, never of the viewer."""
        table = self.part_table[part]
        cos, sin = table[:, 0], table[:, 1]
        offset = points - table[:, 2:5]
        local_x, local_y = cos * offset[:, 0] + sin * offset[:, 1], cos * offset[:, 1] - sin * offset[:, 0]
        q = (np.stack([local_x, local_y, offset[:, 2]], -1) - table[:, 5:8]) * table[:, 8:11]
        normal_x, normal_y = cos * normals[:, 0] + sin * normals[:, 1], cos * normals[:, 1] - sin * normals[:, 0]
        # Triplanar: project along the dominant local normal axis, reading the image as a viewer facing the face.
        along_x, along_y, along_z = np.abs(normal_x), np.abs(normal_y), np.abs(normals[:, 2])
        u = np.where(along_y >= along_x, np.where(normal_y > 0, 1 - q[:, 0], q[:, 0]),
                     np.where(normal_x > 0, q[:, 1], 1 - q[:, 1]))
        v = q[:, 2].copy()
        top = (along_z > along_x) & (along_z > along_y)
        u[top], v[top] = q[top, 0], q[top, 1]
        contrast = table[:, 14:15]
        albedo = table[:, 11:14] * (1 - contrast + contrast * _sample_texture(self.bank, table[:, 15], u, v))
        to_light = self.light - points
        distance = np.sqrt(np.einsum("ij,ij->i", to_light, to_light))
        facing = np.maximum(np.einsum("ij,ij->i", normals, to_light) / distance, 0)
        lit = np.flatnonzero(facing > 0)
        if len(lit):
            shadow_origins = points[lit] + 2e-3 * normals[lit]
            facing[lit[self._cast(shadow_origins, self.light - shadow_origins)["t_hit"].numpy() < 1]] = 0
        fill = np.maximum(normals @ np.array([0.3, -0.5, 0.81], dtype=np.float32), 0)
        irradiance = 0.42 + 0.08 * normals[:, 2] + 0.75 * facing / (1 + (distance / 3.0) ** 2) + 0.15 * fill
        return np.minimum(albedo * irradiance[:, None], 1)

    def render(self, intrinsics: np.ndarray, world_to_camera: np.ndarray, height: int, width: int) -> dict:
        """The :class:`DemoScene` arrays but the camera's, keyed by field name."""
        # The centre ray first; the rays have camera z = 1, so t_hit is the z-depth.
        rays_camera = pixel_rays(intrinsics, height, width, ((0.0, 0.0), *_SUBPIXEL_OFFSETS))
        count, out = height * width, {key: [] for key in ("images", "depth", "normals", "instances", "semantics")}
        for pose in world_to_camera:
            centre = -pose[:3, :3].T @ pose[:3, 3]
            rotation = np.ascontiguousarray(pose[:3, :3], dtype=np.float32)  # a strided one makes matmul crawl
            directions = rays_camera @ rotation  # each row rotated by rotation.T
            t_hit, part, normals = self.cast(centre, directions)
            points = centre.astype(np.float32) + t_hit[:, None] * directions
            colour = self.shade(points[count:], part[count:], normals[count:])
            facing_away = np.einsum("ij,ij->i", normals[:count], directions[:count]) > 0
            out["images"].append(np.round(colour.reshape(-1, height, width, 3).mean(0) * 255).astype(np.uint8))
            out["depth"].append(t_hit[:count].reshape(height, width))
            facing_camera = np.where(facing_away[:, None], -normals[:count], normals[:count])
            out["normals"].append((facing_camera @ rotation.T).reshape(height, width, 3))
            out["instances"].append(self.instance[part[:count]].reshape(height, width))
            out["semantics"].append(self.semantic[part[:count]].reshape(height, width))
        return {key: np.stack(value) for key, value in out.items()}


def generate_scene(seed: int, frames: int, height: int, width: int, horizontal_fov_degrees: float) -> DemoScene:
    """Render one furnished room seen by a hand-held-like camera; the same arguments give identical arrays.

    Args:
        seed: any integer; selects the room, its furniture, materials, lighting and camera path.
        frames: number of frames ``F``; consecutive ones are 5-10 cm and a few degrees apart.
        height, width: image size ``H`` x ``W`` in pixels.
        horizontal_fov_degrees: horizontal field of view; pixels are square.
    """
    if frames < 1 or height < 1 or width < 1 or not 0 < horizontal_fov_degrees < 180:
        raise ValueError(f"invalid demo scene size: frames={frames}, {height}x{width}, fov={horizontal_fov_degrees}")
    rng = np.random.default_rng([seed % 2**64, 0x5D])  # seed sequences take non-negative words only
    texture_index, bank = _texture_bank()
    palette = _Palette(rng, texture_index)
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        room = (rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.0), rng.uniform(2.6, 3.0))
        furniture, obstacles = _furnish(rng, room, palette)
        world_to_camera = _camera_path(rng, room, np.array(obstacles).reshape(-1, 4), frames)
        if world_to_camera is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: no free camera path found in {_MAX_LAYOUT_ATTEMPTS} furnished rooms")
    focal = width / 2 / np.tan(np.deg2rad(horizontal_fov_degrees) / 2)
    # A principal point a few pixels off-centre catches code that assumes a centred one.
    principal = np.array([width, height]) * (0.5 + rng.choice([-1, 1], 2) * rng.uniform(0.012, 0.025, 2))
    intrinsics = np.array([[focal, 0, principal[0]], [0, focal, principal[1]], [0, 0, 1]], dtype=np.float64)
    light = np.array([room[0] / 2 + rng.uniform(-0.6, 0.6), room[1] / 2 + rng.uniform(-0.6, 0.6), room[2] - 0.3])
    renderer = _Renderer(_room(room, palette) + furniture, bank, light)
    return DemoScene(intrinsics=intrinsics, world_to_camera=world_to_camera,
                     **renderer.render(intrinsics, world_to_camera, height, width))
