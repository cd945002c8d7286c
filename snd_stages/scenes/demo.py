"""Synthetic indoor RGB-D scenes: the embedded default dataset.

Each scene is a closed box room (floor, ceiling and four walls, each its own instance) furnished with pieces
assembled from primitives (tables with legs, chairs, cabinets, shelves, a bed or a sofa, lamps, plants, a door,
pictures, a rug) and small objects standing on tables, cabinets, shelf boards and the floor. Surfaces carry
scikit-image's bundled photographs through triplanar mapping in their object's frame, and are lit by
view-independent Lambertian shading (hemispherical ambient, a point light under the ceiling that casts
shadows, a directional fill), so a surface point has the same colour in every frame. A hand-held-like camera
follows an arc of a perturbed ellipse through free space while looking across the room. Open3D's raycaster
renders colour (2x2 supersampled), z-depth, normals, instance and semantic labels (from the pixel-centre ray).

World frame: z up, floor at z = 0, the room spans [0, Lx] x [0, Ly] x [0, Lz]. Cameras follow
:mod:`snd_stages.geometry`'s conventions (OpenCV, world-to-camera, pixel centres at (j + 0.5, i + 0.5)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d
import skimage.data
from PIL import Image

SEMANTIC_CLASSES: tuple[str, ...] = (
    "wall", "floor", "ceiling", "door", "picture", "rug", "table", "chair", "cabinet", "shelf",
    "bed", "sofa", "lamp", "plant", "box", "ball", "vase", "cone", "ring",
)
_SMALL_CLASSES = ("box", "ball", "vase", "cone", "ring")
_CLASS_ID = {name: index for index, name in enumerate(SEMANTIC_CLASSES)}

_TEXTURE_SIZE = 128
_GRAY_TEXTURES = ("brick", "grass", "gravel", "moon", "camera", "coins", "text", "page", "cell", "checkerboard", "clock")
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
_WOOD_TINTS = ((0.62, 0.42, 0.25), (0.78, 0.6, 0.4), (0.45, 0.3, 0.2), (0.86, 0.74, 0.54))
_FABRIC_TINTS = ((0.6, 0.22, 0.2), (0.22, 0.36, 0.58), (0.3, 0.52, 0.36), (0.74, 0.62, 0.42), (0.52, 0.52, 0.56),
                 (0.84, 0.48, 0.2), (0.46, 0.3, 0.56), (0.85, 0.8, 0.72))
_PAINT_TINTS = ((0.93, 0.91, 0.86), (0.84, 0.88, 0.93), (0.92, 0.85, 0.74), (0.8, 0.86, 0.78), (0.95, 0.9, 0.9))
_WALL_MARGIN = 0.55  # camera centres stay this far from walls (metres)
_OBSTACLE_MARGIN = 0.4  # ... and this far from furniture footprints
_MAX_LAYOUT_ATTEMPTS = 50
_MAX_PATH_ATTEMPTS = 200
_MAX_TURN_PER_FRAME = np.deg2rad(6.0)
# Colour samples per pixel at these offsets from its centre (a cheap anti-aliasing: two samples halve the
# rendering time of a 2x2 grid); depth, normals and labels come from the centre ray.
_SUBPIXEL_OFFSETS = ((-0.25, -0.25), (0.25, 0.25))


@dataclass(frozen=True)
class DemoScene:
    """A rendered scene; ``F`` frames of ``H`` x ``W`` pixels.

    Attributes:
        images: ``[F, H, W, 3]`` uint8 RGB.
        depth: ``[F, H, W]`` float32 metric z-depth, positive everywhere (the room is closed).
        normals: ``[F, H, W, 3]`` float32 unit normals in the OpenCV camera frame, facing the camera.
        instances: ``[F, H, W]`` int32 instance ids >= 1, the same object having the same id in every frame.
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
    """Albedo = tint * (1 - contrast + contrast * texture), the texture repeating (mirrored) every ``scale``."""

    texture: int
    tint: np.ndarray  # [3]
    contrast: float
    scale: np.ndarray  # [3] metres per texture repeat along the object's local x, y, z
    origin: np.ndarray  # [3] local point at the texture's corner


@dataclass
class _Object:
    """One instance: parts in a local frame (x along its width, y towards its front, z up, origin on the floor)."""

    class_name: str
    parts: list[tuple[np.ndarray, np.ndarray, _Material]]  # local vertices [V, 3], triangles [T, 3], material
    size: tuple[float, float, float]  # footprint width, depth and height
    supports: list[tuple[float, ...]]  # local (x, y, z, half width, half depth, free height) of shelf-like surfaces
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


def _mesh(geometry: o3d.geometry.TriangleMesh, offset) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(geometry.vertices) + np.asarray(offset, dtype=np.float64), np.asarray(geometry.triangles)


def _box(lo, hi):
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return _mesh(o3d.geometry.TriangleMesh.create_box(*(hi - lo)), lo)


def _cylinder(x, y, z0, z1, radius):
    return _mesh(o3d.geometry.TriangleMesh.create_cylinder(radius, z1 - z0, 20, 1), (x, y, (z0 + z1) / 2))


def _sphere(x, y, z, radius):
    return _mesh(o3d.geometry.TriangleMesh.create_sphere(radius, 16), (x, y, z))


def _quad(corner, edge_u, edge_v):
    """A rectangle facing edge_u x edge_v."""
    corner, edge_u, edge_v = (np.asarray(a, dtype=np.float64) for a in (corner, edge_u, edge_v))
    return np.stack([corner, corner + edge_u, corner + edge_u + edge_v, corner + edge_v]), np.array([[0, 1, 2], [0, 2, 3]])


class _Palette:
    """Seeded material choices, per room."""

    def __init__(self, rng: np.random.Generator, texture_index: dict[str, int]):
        self.rng, self.index = rng, texture_index

    def _make(self, names, tints, contrast, scale, origin=None) -> _Material:
        tint = np.asarray(tints[self.rng.integers(len(tints))]) * self.rng.uniform(0.9, 1.1, 3)
        phase = self.rng.uniform(0, 2, 3) * scale  # a random texture phase, so equal objects differ
        return _Material(self.index[names[self.rng.integers(len(names))]], np.clip(tint, 0, 1),
                         self.rng.uniform(*contrast), np.asarray(scale, dtype=np.float64),
                         phase if origin is None else np.broadcast_to(np.asarray(origin, dtype=np.float64), (3,)))

    def wood(self) -> _Material:  # streaks from stretched stones read as grain
        return self._make(("gravel", "grass"), _WOOD_TINTS, (0.35, 0.55), np.array([self.rng.uniform(1.0, 2.0), 0.12, 0.12]))

    def fabric(self) -> _Material:
        return self._make(("gravel", "grass", "cell", "coins"), _FABRIC_TINTS, (0.25, 0.45), np.full(3, self.rng.uniform(0.25, 0.6)))

    def paint(self, tints=_PAINT_TINTS) -> _Material:
        return self._make(("moon", "gravel"), tints, (0.08, 0.2), np.full(3, 1.5))

    def pattern(self) -> _Material:
        return self._make(("checkerboard", "brick", "text", "page", "clock", "camera", "coins"), _FABRIC_TINTS + _PAINT_TINTS,
                          (0.5, 0.8), np.full(3, self.rng.uniform(0.15, 0.5)))

    def photo(self, lo, size, names=_PHOTOS) -> _Material:
        return self._make(names, ((1.0, 1.0, 1.0),), (1.0, 1.0), np.maximum(np.asarray(size, dtype=np.float64), 1e-3), lo)

    def small_object(self) -> _Material:
        choice = self.rng.integers(3)
        return self.pattern() if choice == 0 else self.fabric() if choice == 1 else self.photo(0.0, np.full(3, 0.3))


def _table(rng, palette):
    width, depth, height = rng.uniform(1.0, 1.6), rng.uniform(0.7, 0.9), rng.uniform(0.72, 0.78)
    top, legs = palette.wood(), palette.wood() if rng.random() < 0.5 else palette.paint(((0.2, 0.2, 0.22),))
    parts = [(*_box((-width / 2, -depth / 2, height - 0.04), (width / 2, depth / 2, height)), top)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (width / 2 - 0.08), sy * (depth / 2 - 0.08)
            parts.append((*_box((x - 0.03, y - 0.03, 0), (x + 0.03, y + 0.03, height - 0.04)), legs))
    return _Object("table", parts, (width, depth, height), [(0, 0, height, width / 2 - 0.05, depth / 2 - 0.05, 0.5)])


def _chair(rng, palette):
    side, back_height = rng.uniform(0.42, 0.5), rng.uniform(0.4, 0.5)
    frame, seat = palette.wood(), palette.fabric() if rng.random() < 0.5 else palette.wood()
    parts = [(*_box((-side / 2, -side / 2, 0.42), (side / 2, side / 2, 0.47)), seat),
             (*_box((-side / 2, -side / 2, 0.47), (side / 2, -side / 2 + 0.04, 0.47 + back_height)), frame)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (side / 2 - 0.03), sy * (side / 2 - 0.03)
            parts.append((*_box((x - 0.02, y - 0.02, 0), (x + 0.02, y + 0.02, 0.42)), frame))
    return _Object("chair", parts, (side, side, 0.47 + back_height), [])


def _cabinet(rng, palette):
    width, depth, height = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.55), rng.uniform(0.7, 1.0)
    knob = palette.paint(((0.25, 0.25, 0.27), (0.7, 0.6, 0.3)))
    parts = [(*_box((-width / 2, -depth / 2, 0), (width / 2, depth / 2, height - 0.03)), palette.paint() if rng.random() < 0.5 else palette.wood()),
             (*_box((-width / 2 - 0.01, -depth / 2, height - 0.03), (width / 2 + 0.01, depth / 2 + 0.01, height)), palette.wood())]
    parts += [(*_sphere(x, depth / 2 + 0.01, height * 0.65, 0.025), knob) for x in (-width / 4, width / 4)]
    return _Object("cabinet", parts, (width, depth, height), [(0, 0, height, width / 2 - 0.05, depth / 2 - 0.05, 0.5)])


def _shelf(rng, palette):
    width, depth, height, boards = rng.uniform(0.8, 1.2), rng.uniform(0.3, 0.4), rng.uniform(1.6, 2.0), int(rng.integers(4, 6))
    wood = palette.wood()
    parts = [(*_box((-width / 2, -depth / 2, 0), (width / 2, -depth / 2 + 0.02, height)), palette.paint())]
    parts += [(*_box((x, -depth / 2, 0), (x + 0.03, depth / 2, height)), wood) for x in (-width / 2, width / 2 - 0.03)]
    levels = np.linspace(0.05, height - 0.03, boards)
    parts += [(*_box((-width / 2 + 0.03, -depth / 2 + 0.02, z), (width / 2 - 0.03, depth / 2, z + 0.03)), wood) for z in levels]
    gap = levels[1] - levels[0]
    supports = [(0, 0.01, z + 0.03, width / 2 - 0.05, depth / 2 - 0.04, gap - 0.06) for z in levels[:-1]]
    return _Object("shelf", parts, (width, depth, height), supports)


def _bed(rng, palette):
    width, depth, head = rng.uniform(1.4, 1.8), rng.uniform(2.0, 2.15), rng.uniform(0.9, 1.1)
    wood, linen = palette.wood(), palette.paint()
    parts = [(*_box((-width / 2, -depth / 2, 0), (width / 2, depth / 2, 0.3)), wood),
             (*_box((-width / 2, -depth / 2, 0), (width / 2, -depth / 2 + 0.06, head)), wood),
             (*_box((-width / 2 + 0.03, -depth / 2 + 0.06, 0.3), (width / 2 - 0.03, depth / 2 - 0.03, 0.5)), linen),
             (*_box((-width / 2 + 0.01, -depth / 2 + 0.75, 0.3), (width / 2 - 0.01, depth / 2 - 0.01, 0.54)), palette.fabric()),
             (*_box((-width / 2 + 0.15, -depth / 2 + 0.12, 0.5), (width / 2 - 0.15, -depth / 2 + 0.5, 0.62)), linen)]
    return _Object("bed", parts, (width, depth, head), [])


def _sofa(rng, palette):
    width, depth = rng.uniform(1.6, 2.2), rng.uniform(0.8, 0.95)
    cover = palette.fabric()
    parts = [(*_box((-width / 2 + 0.15, -depth / 2 + 0.2, 0), (width / 2 - 0.15, depth / 2, 0.42)), cover),
             (*_box((-width / 2, -depth / 2, 0), (width / 2, -depth / 2 + 0.2, 0.85)), cover)]
    parts += [(*_box((x, -depth / 2, 0), (x + 0.15, depth / 2, 0.6)), cover) for x in (-width / 2, width / 2 - 0.15)]
    return _Object("sofa", parts, (width, depth, 0.85), [])


def _lamp(rng, palette):
    metal, shade_radius, top = palette.paint(((0.25, 0.25, 0.27), (0.75, 0.65, 0.35))), rng.uniform(0.16, 0.22), rng.uniform(1.5, 1.7)
    parts = [(*_cylinder(0, 0, 0, 0.03, 0.14), metal), (*_cylinder(0, 0, 0.03, top - 0.2, 0.015), metal),
             (*_cylinder(0, 0, top - 0.25, top, shade_radius), palette.paint(((0.95, 0.9, 0.75), (0.9, 0.85, 0.85))))]
    return _Object("lamp", parts, (2 * shade_radius, 2 * shade_radius, top), [])


def _plant(rng, palette):
    pot_radius, pot_height, leaves = rng.uniform(0.13, 0.2), rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.38)
    foliage = palette._make(("grass",), ((0.25, 0.5, 0.2), (0.35, 0.55, 0.25)), (0.6, 0.8), np.full(3, 0.3))
    pot = palette._make(("gravel", "coins"), ((0.7, 0.4, 0.28), (0.85, 0.85, 0.85)), (0.3, 0.5), np.full(3, 0.3))
    if rng.random() < 0.5:
        crown = _sphere(0, 0, pot_height + 0.8 * leaves, leaves)
    else:
        crown = _mesh(o3d.geometry.TriangleMesh.create_cone(leaves, 3.5 * leaves, 16, 1), (0, 0, pot_height))
    parts = [(*_cylinder(0, 0, 0, pot_height, pot_radius), pot), (*crown, foliage)]
    return _Object("plant", parts, (2 * leaves, 2 * leaves, pot_height + 3.5 * leaves), [])


def _door(rng, palette):
    width, height = rng.uniform(0.85, 0.95), rng.uniform(2.0, 2.1)
    parts = [(*_box((-width / 2, -0.02, 0), (width / 2, 0.02, height)), palette.wood()),
             (*_sphere(width / 2 - 0.1, 0.05, 1.0, 0.03), palette.paint(((0.7, 0.6, 0.3),)))]
    return _Object("door", parts, (width, 0.04, height), [])


def _picture(rng, palette):
    width, height = rng.uniform(0.4, 1.0), rng.uniform(0.35, 0.8)
    frame = palette.paint(((0.15, 0.12, 0.1), (0.85, 0.8, 0.7), (0.6, 0.45, 0.25)))
    parts = [(*_box((-width / 2 - 0.04, -0.015, -0.04), (width / 2 + 0.04, 0.015, height + 0.04)), frame),
             (*_box((-width / 2, -0.015, 0), (width / 2, 0.02, height)), palette.photo((-width / 2, -0.015, 0), (width, 0.035, height)))]
    return _Object("picture", parts, (width + 0.08, 0.035, height), [])


def _rug(rng, palette):
    width, depth = rng.uniform(1.4, 2.4), rng.uniform(1.0, 1.7)
    material = palette._make(("checkerboard", "immunohistochemistry", "colorwheel", "coins", "brick"), _FABRIC_TINTS,
                             (0.5, 0.8), np.array([width / 2, depth / 2, 1.0]), (-width / 2, -depth / 2, 0))
    return _Object("rug", [(*_box((-width / 2, -depth / 2, 0), (width / 2, depth / 2, 0.012)), material)], (width, depth, 0.012), [])


def _small_object(rng, palette):
    """A small primitive object and its footprint radius."""
    kind, material = _SMALL_CLASSES[rng.integers(len(_SMALL_CLASSES))], palette.small_object()
    if kind == "box":
        w, d, h = rng.uniform(0.1, 0.32, 3)
        mesh, radius, height = _box((-w / 2, -d / 2, 0), (w / 2, d / 2, h)), np.hypot(w, d) / 2, h
    elif kind == "ball":
        radius = height = rng.uniform(0.06, 0.14)
        mesh, height = _sphere(0, 0, radius, radius), 2 * radius
    elif kind == "vase":
        radius, height = rng.uniform(0.04, 0.09), rng.uniform(0.15, 0.35)
        mesh = _cylinder(0, 0, 0, height, radius)
    elif kind == "cone":
        radius, height = rng.uniform(0.05, 0.12), rng.uniform(0.15, 0.35)
        mesh = _mesh(o3d.geometry.TriangleMesh.create_cone(radius, height, 20, 1), (0, 0, 0))
    else:
        ring, tube = rng.uniform(0.07, 0.13), rng.uniform(0.025, 0.04)
        mesh, radius, height = _mesh(o3d.geometry.TriangleMesh.create_torus(ring, tube, 20, 10), (0, 0, tube)), ring + tube, 2 * tube
    return _Object(kind, [(*mesh, material)], (2 * radius, 2 * radius, height), [], yaw=rng.uniform(0, 2 * np.pi)), radius


def _overlaps(rect: np.ndarray, others: list[np.ndarray], gap: float) -> bool:
    return any(rect[0] < o[2] + gap and o[0] < rect[2] + gap and rect[1] < o[3] + gap and o[1] < rect[3] + gap for o in others)


def _against_wall(rng, room, obj: _Object, occupied: list[np.ndarray], height: float = 0.0, gap: float = 0.02) -> bool:
    """Put ``obj`` with its back to a random wall, ``height`` above the floor, where it overlaps nothing."""
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
    """Furniture, wall decoration and small objects; returns them and the footprints the camera must avoid."""
    lx, ly = room[:2]
    occupied, obstacles, placed = [], [], []

    def add(obj: _Object, height: float = 0.0, obstacle: bool = True) -> bool:
        if not _against_wall(rng, room, obj, occupied, height):
            return False
        placed.append(obj)
        if obstacle:
            obstacles.append(obj.footprint())
        return True

    def add_chair(chair: _Object) -> None:  # next to the table placed last, clear of everything else
        if not _overlaps(chair.footprint(), occupied[:-1], 0.0):
            placed.append(chair)
            occupied.append(chair.footprint())
            obstacles.append(chair.footprint())

    door = _door(rng, palette)
    if add(door, obstacle=False):  # keeps the floor in front of the door clear
        occupied.append(np.concatenate([door.position[:2] - 0.5, door.position[:2] + 0.5]))
    big = [_bed, _sofa] if rng.random() < 0.5 else [_sofa, _bed]
    for build in big[: 1 + int(min(lx, ly) > 5.5 and rng.random() < 0.5)] + [_shelf, _cabinet, _lamp, _plant]:
        add(build(rng, palette))
    extras = (_cabinet, _plant, _lamp, _shelf, _chair)
    for build in rng.choice(extras, int(rng.integers(2, 5) + (lx + ly - 8) // 2)):  # more in larger rooms
        add(build(rng, palette))
    table = _table(rng, palette)
    if min(lx, ly) > 5.0 and rng.random() < 0.7:  # a dining group in the middle of the room
        table.yaw = rng.integers(4) * np.pi / 2 + rng.uniform(-0.2, 0.2)
        table.position = np.array([lx / 2 + rng.uniform(-0.4, 0.4), ly / 2 + rng.uniform(-0.4, 0.4), 0.0])
        if not _overlaps(table.footprint(), occupied, 0.2):
            placed.append(table)
            occupied.append(table.footprint())
            obstacles.append(table.footprint())
            for side in rng.permutation(4)[: rng.integers(2, 5)]:
                reach, angle = (table.size[1] if side % 2 == 0 else table.size[0]) / 2 + 0.3, side * np.pi / 2
                chair = _chair(rng, palette)
                chair.yaw = table.yaw + angle  # facing the table
                chair.position = table.to_world(np.array([[reach * np.sin(angle), -reach * np.cos(angle), 0]]))[0]
                add_chair(chair)
    elif add(table):
        for offset in rng.permutation([-0.3, 0.3])[: rng.integers(1, 3)]:
            chair = _chair(rng, palette)
            chair.yaw = table.yaw + np.pi  # facing the table and the wall behind it
            chair.position = table.to_world(np.array([[offset * table.size[0], table.size[1] / 2 + 0.25, 0]]))[0]
            add_chair(chair)
    if rng.random() < 0.7:
        rug = _rug(rng, palette)
        rug.yaw, rug.position = rng.integers(2) * np.pi / 2, np.array([lx / 2 + rng.uniform(-0.5, 0.5), ly / 2 + rng.uniform(-0.5, 0.5), 0.0])
        placed.append(rug)
    # Pictures hang above low furniture: they only have to avoid what reaches up to them.
    tall = [obj.footprint() for obj in placed if obj.size[2] > 1.0]
    for _ in range(int(rng.integers(2, 5))):
        picture = _picture(rng, palette)
        if _against_wall(rng, room, picture, tall, height=rng.uniform(1.15, max(1.2, 1.95 - picture.size[2])), gap=0.0):
            placed.append(picture)
    supports = [(obj, support) for obj in placed for support in obj.supports]
    for _ in range(int(rng.integers(5, 9))):
        small, radius = _small_object(rng, palette)
        if not supports or rng.random() < 0.15:
            add(small)
            continue
        owner, (x, y, z, half_x, half_y, free) = supports[rng.integers(len(supports))]
        if small.size[2] > free or half_x < radius or half_y < radius:
            continue
        local = np.array([[x + rng.uniform(-1, 1) * (half_x - radius), y + rng.uniform(-1, 1) * (half_y - radius), z]])
        small.position = owner.to_world(local)[0]
        if not any(np.hypot(*(small.position[:2] - other.position[:2])) < radius + other.size[0] / 2 + 0.03
                   for other in placed if other.class_name in _SMALL_CLASSES):
            placed.append(small)
    return placed, obstacles


def _room_parts(room, palette) -> list[_Object]:
    lx, ly, lz = room
    wall = palette._make(("brick", "gravel", "moon"), _PAINT_TINTS, (0.25, 0.5), np.full(3, palette.rng.uniform(1.0, 1.8)))
    floor_choice = palette.rng.integers(3)
    floor = (palette.wood() if floor_choice == 0 else palette._make(("checkerboard",), _PAINT_TINTS + _WOOD_TINTS, (0.3, 0.5), np.full(3, palette.rng.uniform(1.2, 2.0)))
             if floor_choice == 1 else palette._make(("grass", "gravel"), _FABRIC_TINTS, (0.3, 0.5), np.full(3, 0.8)))
    if floor_choice == 0:  # planks: grain along x, a few tens of centimetres wide
        floor = _Material(floor.texture, floor.tint, floor.contrast, np.array([2.0, 0.25, 1.0]), floor.origin)
    quads = [("floor", (0, 0, 0), (lx, 0, 0), (0, ly, 0), floor), ("ceiling", (0, 0, lz), (0, ly, 0), (lx, 0, 0), palette.paint()),
             ("wall", (0, 0, 0), (0, 0, lz), (lx, 0, 0), wall), ("wall", (lx, 0, 0), (0, 0, lz), (0, ly, 0), wall),
             ("wall", (0, ly, 0), (lx, 0, 0), (0, 0, lz), wall), ("wall", (0, 0, 0), (0, ly, 0), (0, 0, lz), wall)]  # facing inwards
    return [_Object(name, [(*_quad(*corners), material)], (lx, ly, lz), []) for name, *corners, material in quads]


def _clearance_ok(points: np.ndarray, room, obstacles: np.ndarray) -> bool:
    lx, ly = room[:2]
    x, y = points[:, 0], points[:, 1]
    if not ((x > _WALL_MARGIN) & (x < lx - _WALL_MARGIN) & (y > _WALL_MARGIN) & (y < ly - _WALL_MARGIN)).all():
        return False
    if len(obstacles) == 0:
        return True
    dx = np.maximum(np.maximum(obstacles[None, :, 0] - x[:, None], x[:, None] - obstacles[None, :, 2]), 0)
    dy = np.maximum(np.maximum(obstacles[None, :, 1] - y[:, None], y[:, None] - obstacles[None, :, 3]), 0)
    return bool((np.hypot(dx, dy) >= _OBSTACLE_MARGIN).all())


def _camera_path(rng, room, obstacles, frames: int) -> np.ndarray | None:
    """``[F, 4, 4]`` world-to-camera poses along an arc of a perturbed ellipse in free space, or None."""
    lx, ly = room[:2]
    step = rng.uniform(0.05, 0.1)
    length = step * max(frames - 1, 1)
    for attempt in range(_MAX_PATH_ATTEMPTS):
        # Orbits around the middle of the room see the most furniture; off-centre ones are the fallback.
        spread = (0.1 + 0.4 * attempt / _MAX_PATH_ATTEMPTS) * np.array([lx, ly])
        centre = np.clip(np.array([lx, ly]) / 2 + rng.uniform(-spread, spread), 1.2, [lx - 1.2, ly - 1.2])
        radii = rng.uniform(1.0, [max(1.0, min(2.2, lx / 2 - 0.5)), max(1.0, min(2.2, ly / 2 - 0.5))])
        phase = rng.uniform(0, 2 * np.pi, 8)
        turn = rng.choice([-1.0, 1.0])
        height, pitch, sweep = rng.uniform(1.33, 1.67), -np.deg2rad(rng.uniform(10, 20)), np.deg2rad(rng.uniform(15, 35))

        def at(theta):  # camera centres, yaw, pitch and roll as smooth functions of the orbit angle
            radial = 1 + 0.08 * np.sin(2 * theta + phase[1]) + 0.05 * np.sin(3 * theta + phase[2])
            xy = centre + radii * radial[:, None] * np.stack([np.cos(theta), np.sin(theta)], -1)
            z = height + 0.08 * np.sin(theta + phase[3]) + 0.05 * np.sin(2.3 * theta + phase[4])
            # Looking across the orbit's centre, sweeping left and right to take in more of the room.
            yaw = np.arctan2(centre[1] - xy[:, 1], centre[0] - xy[:, 0]) + sweep * np.sin(1.5 * theta + phase[5])
            return (np.concatenate([xy, z[:, None]], -1), yaw, pitch + np.deg2rad(5) * np.sin(0.8 * theta + phase[6]),
                    np.deg2rad(2) * np.sin(1.3 * theta + phase[7]))

        turns = 1 + int(np.ceil(length / (2 * np.pi * 0.85 * radii.min())))  # long sequences circle repeatedly
        dense_theta = phase[0] + turn * np.linspace(0, 2 * np.pi * turns, 1024 * turns)
        dense = at(dense_theta)[0]
        arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=-1))])
        if not _clearance_ok(dense[arc <= length + 0.01], room, obstacles):
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
        world_to_camera[:, :3, :3] = np.stack([right, down, forward], 1)  # rows: camera axes in world
        world_to_camera[:, :3, 3] = -np.einsum("fij,fj->fi", world_to_camera[:, :3, :3], centres)
        return world_to_camera
    return None


def _texture_bank() -> tuple[dict[str, int], np.ndarray]:
    """``[T, S, S, 3]`` float32 textures in [0, 1], square centre crops of scikit-image's bundled images."""
    names = _GRAY_TEXTURES + _PHOTOS
    bank = np.empty((len(names), _TEXTURE_SIZE, _TEXTURE_SIZE, 3), dtype=np.float32)
    for index, name in enumerate(names):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((_TEXTURE_SIZE, _TEXTURE_SIZE), Image.Resampling.BOX)
        bank[index] = np.asarray(square, dtype=np.float32) / 255.0
    return {name: index for index, name in enumerate(names)}, bank


def _sample_texture(bank: np.ndarray, texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup with mirrored repeat (seamless tiling); u right, v up, one repeat per unit. -> [N, 3]."""
    size = bank.shape[1]
    x, y = u * size - 0.5, (1 - v) * size - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def mirrored(i):
        i = np.mod(i.astype(np.int32), 2 * size)
        return np.where(i >= size, 2 * size - 1 - i, i)

    flat, base = bank.reshape(-1, 3), texture.astype(np.int32) * (size * size)
    rows, cols = (mirrored(y0), mirrored(y0 + 1)), (mirrored(x0), mirrored(x0 + 1))
    fetch = lambda r, c: flat[base + rows[r] * size + cols[c]]  # noqa: E731
    return (fetch(0, 0) * (1 - fx) + fetch(0, 1) * fx) * (1 - fy) + (fetch(1, 0) * (1 - fx) + fetch(1, 1) * fx) * fy


class _Renderer:
    """All objects in one raycasting scene; per-triangle part index -> instance, class, frame and material."""

    def __init__(self, objects: list[_Object], bank: np.ndarray, light: np.ndarray):
        vertices, triangles, part_of_triangle, parts = [], [], [], []
        offset = 0
        for instance, obj in enumerate(objects, start=1):
            for local_vertices, local_triangles, material in obj.parts:
                vertices.append(obj.to_world(local_vertices))
                triangles.append(local_triangles + offset)
                part_of_triangle.append(np.full(len(local_triangles), len(parts)))
                parts.append((instance, _CLASS_ID[obj.class_name], obj.yaw, obj.position, material))
                offset += len(local_vertices)
        self.raycaster = o3d.t.geometry.RaycastingScene()
        self.raycaster.add_triangles(o3d.core.Tensor(np.concatenate(vertices).astype(np.float32)),
                                     o3d.core.Tensor(np.concatenate(triangles).astype(np.uint32)))
        self.part_of_triangle = np.concatenate(part_of_triangle)
        self.instance = np.array([p[0] for p in parts], dtype=np.int32)
        self.semantic = np.array([p[1] for p in parts], dtype=np.int32)
        self.cos_sin = np.array([(np.cos(p[2]), np.sin(p[2])) for p in parts], dtype=np.float32)
        self.position = np.array([p[3] for p in parts], dtype=np.float32)
        self.texture = np.array([p[4].texture for p in parts])
        self.tint = np.array([p[4].tint for p in parts], dtype=np.float32)
        self.contrast = np.array([p[4].contrast for p in parts], dtype=np.float32)
        self.scale = np.array([p[4].scale for p in parts], dtype=np.float32)
        self.origin = np.array([p[4].origin for p in parts], dtype=np.float32)
        self.bank, self.light = bank, light.astype(np.float32)

    def _cast(self, origins: np.ndarray, directions: np.ndarray) -> dict:
        rays = np.empty((len(directions), 6), dtype=np.float32)
        rays[:, :3], rays[:, 3:] = origins, directions
        return self.raycaster.cast_rays(o3d.core.Tensor(rays))

    def cast(self, origin: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hits of rays from inside the closed room: z-depth-like distances in units of ``directions``' lengths,
        part indices and unit normals on the side the triangle winding makes the outside."""
        hit = self._cast(origin, directions)
        t_hit = hit["t_hit"].numpy()
        if not np.isfinite(t_hit).all():
            raise RuntimeError("a camera ray left the room; the room must be closed around every camera")
        return t_hit, self.part_of_triangle[hit["primitive_ids"].numpy()], hit["primitive_normals"].numpy()

    def shade(self, points: np.ndarray, part: np.ndarray, normals: np.ndarray) -> np.ndarray:
        """``[N, 3]`` RGB in [0, 1] of surface points; it depends on the point only, never on the viewer."""
        cos, sin = self.cos_sin[part, 0], self.cos_sin[part, 1]
        offset = points - self.position[part]
        q = (np.stack([cos * offset[:, 0] + sin * offset[:, 1], cos * offset[:, 1] - sin * offset[:, 0], offset[:, 2]], -1)
             - self.origin[part]) / self.scale[part]
        normal_x = cos * normals[:, 0] + sin * normals[:, 1]
        normal_y = cos * normals[:, 1] - sin * normals[:, 0]
        # Triplanar: project along the dominant local normal axis, reading the image as a viewer facing the face.
        along_x, along_y = np.abs(normal_x), np.abs(normal_y)
        along_z = np.abs(normals[:, 2])
        u = np.where(along_y >= along_x, np.where(normal_y > 0, 1 - q[:, 0], q[:, 0]), np.where(normal_x > 0, q[:, 1], 1 - q[:, 1]))
        v = q[:, 2]
        top = (along_z > along_x) & (along_z > along_y)
        u[top], v[top] = q[top, 0], q[top, 1]
        texel = _sample_texture(self.bank, self.texture[part], u, v)
        contrast = self.contrast[part, None]
        albedo = self.tint[part] * (1 - contrast + contrast * texel)
        to_light = self.light - points
        distance = np.sqrt(np.einsum("ij,ij->i", to_light, to_light))
        facing = np.maximum(np.einsum("ij,ij->i", normals, to_light) / distance, 0)
        lit = np.flatnonzero(facing > 0)
        if len(lit):
            shadow_origins = points[lit] + 2e-3 * normals[lit]
            blocked = self._cast(shadow_origins, self.light - shadow_origins)["t_hit"].numpy() < 1
            facing[lit[blocked]] = 0
        fill = np.maximum(normals @ np.array([0.3, -0.5, 0.81], dtype=np.float32), 0)
        irradiance = 0.42 + 0.08 * normals[:, 2] + 0.75 * facing / (1 + (distance / 3.0) ** 2) + 0.15 * fill
        return np.minimum(albedo * irradiance[:, None], 1)

    def render(self, intrinsics: np.ndarray, world_to_camera: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
        rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        offsets = np.array([(0.0, 0.0), *_SUBPIXEL_OFFSETS])
        pixels = np.stack([cols.ravel()[None] + offsets[:, :1], rows.ravel()[None] + offsets[:, 1:], np.ones((len(offsets), height * width))], -1)
        rays_camera = pixels.reshape(-1, 3) @ np.linalg.inv(intrinsics).T  # z = 1, so t_hit is the z-depth
        pixel_count, out = height * width, {k: [] for k in ("images", "depth", "normals", "instances", "semantics")}
        for pose in world_to_camera:
            rotation = pose[:3, :3]
            centre = -rotation.T @ pose[:3, 3]
            directions = (rays_camera @ rotation).astype(np.float32)  # rotation.T applied to each row
            t_hit, part, normals = self.cast(centre, directions)
            points = centre.astype(np.float32) + t_hit[:, None] * directions
            colour = self.shade(points[pixel_count:], part[pixel_count:], normals[pixel_count:])
            colour = colour.reshape(len(_SUBPIXEL_OFFSETS), height, width, 3).mean(0)
            towards_camera = np.einsum("ij,ij->i", normals[:pixel_count], directions[:pixel_count]) > 0
            facing_camera = np.where(towards_camera[:, None], -normals[:pixel_count], normals[:pixel_count])
            out["images"].append(np.round(colour * 255).astype(np.uint8))
            out["depth"].append(t_hit[:pixel_count].reshape(height, width))
            out["normals"].append((facing_camera @ rotation.T.astype(np.float32)).reshape(height, width, 3))
            out["instances"].append(self.instance[part[:pixel_count]].reshape(height, width))
            out["semantics"].append(self.semantic[part[:pixel_count]].reshape(height, width))
        return {key: np.stack(value) for key, value in out.items()}


def generate_scene(seed: int, frames: int, height: int, width: int, horizontal_fov_degrees: float) -> DemoScene:
    """Render one furnished room seen by a hand-held-like camera; the same arguments give identical arrays.

    Args:
        seed: selects the room, its furniture, materials, lighting and camera path.
        frames: number of frames ``F``, consecutive ones a few centimetres and degrees apart.
        height, width: image size ``H`` x ``W`` in pixels.
        horizontal_fov_degrees: horizontal field of view; pixels are square.
    """
    if frames < 1 or height < 1 or width < 1 or not 0 < horizontal_fov_degrees < 180:
        raise ValueError(f"invalid demo scene size: frames={frames}, {height}x{width}, fov={horizontal_fov_degrees}")
    rng = np.random.default_rng([seed, 0x5D])
    texture_index, bank = _texture_bank()
    palette = _Palette(rng, texture_index)
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        room = (rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.0), rng.uniform(2.6, 3.0))
        furniture, obstacles = _furnish(rng, room, palette)
        world_to_camera = _camera_path(rng, room, np.array(obstacles).reshape(-1, 4), frames)
        if world_to_camera is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: found no free camera path in {_MAX_LAYOUT_ATTEMPTS} furnished rooms")
    focal = width / 2 / np.tan(np.deg2rad(horizontal_fov_degrees) / 2)
    # Off-centre principal point, so that code assuming a centred one is caught.
    principal = np.array([width, height]) * (0.5 + rng.choice([-1, 1], 2) * rng.uniform(0.012, 0.025, 2))
    intrinsics = np.array([[focal, 0, principal[0]], [0, focal, principal[1]], [0, 0, 1]], dtype=np.float64)
    light = np.array([room[0] / 2 + rng.uniform(-0.6, 0.6), room[1] / 2 + rng.uniform(-0.6, 0.6), room[2] - 0.3])
    rendered = _Renderer(_room_parts(room, palette) + furniture, bank, light).render(intrinsics, world_to_camera, height, width)
    return DemoScene(intrinsics=intrinsics, world_to_camera=world_to_camera, **rendered)
