"""NYU Depth v2, labeled set: a lazy reader of ``nyu_depth_v2_labeled.mat`` and its split / class files.

Files (all from the official NYU Depth v2 release and the toolkits that every probe protocol uses)::

    nyu_depth_v2_labeled.mat   MATLAB v7.3 (= HDF5 with a 512-byte MATLAB header block), 1449 frames:
                                 images     MATLAB 480x640x3xN uint8    -> HDF5 [N, 3, 640, 480]
                                 depths     MATLAB 480x640xN single (m) -> HDF5 [N, 640, 480] (inpainted)
                                 rawDepths  MATLAB 480x640xN single (m) -> HDF5 [N, 640, 480] (holes = 0)
                                 labels     MATLAB 480x640xN uint16     -> HDF5 [N, 640, 480], 0 = unlabelled,
                                            1..894 index ``names``
                                 names, namesToIds, instances, sceneTypes, scenes, accelData (not read here)
    splits.mat                 MATLAB v5: ``trainNdxs`` (795x1) and ``testNdxs`` (654x1), 1-based frame numbers
    classMapping40.mat         MATLAB v5 (Gupta et al.): ``mapClass`` 1x894, raw id -> 1..40; ``className``
    class13Mapping.mat         MATLAB v5: struct ``classMapping13`` whose numeric field (1x40) maps the 40
                               classes -> 1..13 (so 13-class labels are ``map13[map40[raw]]``), plus the names

MATLAB stores arrays column-major and h5py reports HDF5 dimensions in reverse, so every array arrives with
its axes reversed: a frame is ``images[n]`` of shape ``[3, W, H]`` and becomes ``[H, W, 3]`` by
``transpose(2, 1, 0)``; 2-D maps become ``[H, W]`` by ``.T``. The image size is read from the file.

Class labels for 40 / 13 classes are returned 0-based with 255 = ignore (the ``reduce_zero_label`` convention
of mmseg: raw 0 "unlabelled" -> 255, class c -> c - 1), so they feed a cross-entropy with ``ignore_index=255``.

Camera: the NYU toolbox's ``camera_params.m`` RGB intrinsics (fx 518.8579, fy 519.4696, cx 325.5824,
cy 253.7362), calibrated with RGBDemo (OpenCV). OpenCV puts the centre of pixel (0, 0) at (0, 0); snd puts it at
(0.5, 0.5) (see :mod:`snd_stages.geometry`), so the principal point is shifted by +0.5 px here. Depth maps of
the labeled set are already registered to the RGB camera, so these intrinsics serve images and depth alike.
The labeled frames carry no poses: each frame's camera sits at the world origin (identity pose).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..geometry import Camera
from .layout import IGNORE_LABEL

# camera_params.m of the NYU Depth v2 toolbox, RGB camera, OpenCV pixel-centre convention.
NYU_FX = 5.1885790117450188e02
NYU_FY = 5.1946961112127485e02
NYU_CX_OPENCV = 3.2558244941119034e02
NYU_CY_OPENCV = 2.5373616633400465e02
# Shift from OpenCV's "pixel centre at integers" to snd's "pixel (i, j) centre at (j + 0.5, i + 0.5)".
PIXEL_CENTER_SHIFT = 0.5
NYU_HEIGHT, NYU_WIDTH = 480, 640

# Eigen et al. evaluation crop of 480x640 NYU frames as used by FiT3D / BTS / AdaBins (``NYUCrop``):
# rows 45:471, columns 41:601 (Python half-open ranges).
EIGEN_CROP_ROWS = (45, 471)
EIGEN_CROP_COLS = (41, 601)

NUM_RAW_CLASSES = 894
SPLITS = ("train", "test")
_SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def eigen_crop_mask(height: int = NYU_HEIGHT, width: int = NYU_WIDTH) -> np.ndarray:
    """Boolean ``[H, W]`` mask, True inside the Eigen crop (rows 45:471, cols 41:601 of a 480x640 frame).

    Only defined for the NYU frame size: the crop removes the white border that registering depth to RGB
    leaves in the labeled frames, so it has no meaning at another resolution.
    """
    if (height, width) != (NYU_HEIGHT, NYU_WIDTH):
        raise DataError(
            f"the Eigen crop is defined for {NYU_HEIGHT}x{NYU_WIDTH} NYUv2 frames, got {height}x{width}; "
            "apply it before resizing"
        )
    mask = np.zeros((height, width), dtype=bool)
    mask[EIGEN_CROP_ROWS[0] : EIGEN_CROP_ROWS[1], EIGEN_CROP_COLS[0] : EIGEN_CROP_COLS[1]] = True
    return mask


def nyu_camera(height: int = NYU_HEIGHT, width: int = NYU_WIDTH) -> Camera:
    """The NYUv2 Kinect RGB camera (float64) at the origin, for frames of ``height`` x ``width``.

    Intrinsics are scaled exactly when the frame is not 480x640 (which only happens for test fixtures or
    resized copies).
    """
    K = np.array(
        [
            [NYU_FX, 0.0, NYU_CX_OPENCV + PIXEL_CENTER_SHIFT],
            [0.0, NYU_FY, NYU_CY_OPENCV + PIXEL_CENTER_SHIFT],
            [0.0, 0.0, 1.0],
        ]
    )
    K[0] *= width / NYU_WIDTH
    K[1] *= height / NYU_HEIGHT
    return Camera(torch.from_numpy(K), torch.eye(4, dtype=torch.float64), height, width)


class NYUv2Labeled:
    """Lazy reader of the NYU Depth v2 labeled set (``nyu_depth_v2_labeled.mat``).

    The HDF5 file is opened on first access and kept open; it reopens itself in a forked worker process
    (h5py handles must not cross ``fork``).

    Args:
        mat_path: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3).
        splits_path: ``splits.mat`` (MATLAB v5), needed by :meth:`split`.
        class_mapping_path: ``classMapping40.mat``; for 13 classes also ``class13Mapping.mat``. Either one path
            (used for the classes it holds) or a dict ``{40: path, 13: path}``. 13-class labels need both.
    """

    def __init__(
        self,
        mat_path: str | Path,
        splits_path: str | Path | None = None,
        class_mapping_path: str | Path | dict[int, str | Path] | None = None,
    ) -> None:
        self.mat_path = Path(mat_path)
        self.splits_path = None if splits_path is None else Path(splits_path)
        if isinstance(class_mapping_path, dict):
            self.class_mapping_paths = {int(k): Path(v) for k, v in class_mapping_path.items()}
        elif class_mapping_path is None:
            self.class_mapping_paths = {}
        else:
            self.class_mapping_paths = {0: Path(class_mapping_path)}  # 0: "whichever classes it holds"
        _check_v73(self.mat_path)
        self._file = None
        self._pid = None
        self._mappings: dict[int, np.ndarray] = {}
        images = self._dataset("images")
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"{self.mat_path}: dataset 'images' has shape {images.shape}; expected [N, 3, W, H] (MATLAB "
                "HxWx3xN uint8 seen through HDF5); use the official nyu_depth_v2_labeled.mat"
            )
        self._count = int(images.shape[0])
        self.width = int(images.shape[2])
        self.height = int(images.shape[3])

    # -- file access -------------------------------------------------------------------------------------

    def _h5(self):
        import os

        import h5py

        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.mat_path, "r")
            except OSError as error:
                raise DataError(f"cannot open {self.mat_path} as HDF5 ({error}); the file is truncated") from None
            self._pid = os.getpid()
        return self._file

    def _dataset(self, key: str):
        import h5py

        file = self._h5()
        if key not in file:
            raise DataError(
                f"{self.mat_path} has no dataset {key!r} (it holds {sorted(file.keys())}); expected the official "
                "nyu_depth_v2_labeled.mat with images, depths, rawDepths and labels"
            )
        if not isinstance(file[key], h5py.Dataset):
            raise DataError(f"{self.mat_path}: {key!r} is an HDF5 {type(file[key]).__name__.lower()}, not an array; "
                            "expected the official nyu_depth_v2_labeled.mat")
        return file[key]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        # h5py handles cannot be pickled (DataLoader workers); reopen lazily on the other side.
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def __len__(self) -> int:
        return self._count

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise DataError(f"NYUv2 frame index must be an integer, got {index!r}")
        if not 0 <= index < self._count:
            raise DataError(
                f"NYUv2 frame index {index} is out of range: {self.mat_path} holds {self._count} frames "
                f"(0-based indices 0..{self._count - 1}; splits.mat numbers are 1-based, use split())"
            )
        return int(index)

    def _map(self, key: str, index: int) -> np.ndarray:
        data = self._dataset(key)
        if data.shape[1:] != (self.width, self.height):
            raise DataError(
                f"{self.mat_path}: dataset {key!r} has frames of {data.shape[1:]} but 'images' is "
                f"{(self.width, self.height)} (W, H as stored); the file is inconsistent"
            )
        return np.ascontiguousarray(data[self._check_index(index)].T)

    # -- frames ------------------------------------------------------------------------------------------

    def image(self, index: int) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB of frame ``index`` (0-based)."""
        stored = self._dataset("images")[self._check_index(index)]  # [3, W, H]
        return np.ascontiguousarray(stored.transpose(2, 1, 0)).astype(np.uint8, copy=False)

    def depth(self, index: int, raw: bool = False) -> np.ndarray:
        """``[H, W]`` float32 metres, 0 where invalid.

        Args:
            raw: read ``rawDepths`` (the Kinect's depth with holes, Probe3D's test target) instead of the
                colorization-inpainted ``depths``.
        """
        depth = self._map("rawDepths" if raw else "depths", index).astype(np.float32)
        # Non-finite or negative values are holes, whatever the file's encoding of them.
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        return depth

    def labels(self, index: int, classes: int | None = 40) -> np.ndarray:
        """Semantic labels of frame ``index``.

        Args:
            classes: ``None`` for the raw ids (``[H, W]`` int64, 0 = unlabelled, 1..894); ``40`` or ``13`` for
                the Gupta 40-class / 13-class sets as ``[H, W]`` uint8, 0-based, 255 = ignore.
        """
        raw = self._map("labels", index).astype(np.int64)
        if classes is None:
            return raw
        if classes not in (40, 13):
            raise DataError(f"NYUv2 labels come in 40 or 13 classes (or None for raw ids), got classes={classes!r}")
        if raw.max(initial=0) > NUM_RAW_CLASSES or raw.min(initial=0) < 0:
            raise DataError(f"{self.mat_path}: frame {index} has label ids outside 0..{NUM_RAW_CLASSES}")
        lookup = self._label_lookup(classes)  # [895] raw id -> 0-based class or 255
        return lookup[raw]

    def camera(self) -> Camera:
        """The Kinect RGB camera of every frame (intrinsics in pixels of the stored frames, identity pose)."""
        return nyu_camera(self.height, self.width)

    # -- splits and classes ------------------------------------------------------------------------------

    def split(self, name: str) -> np.ndarray:
        """0-based frame indices of the official ``"train"`` (795) or ``"test"`` (654) split, in file order."""
        if name not in SPLITS:
            raise DataError(f"unknown NYUv2 split {name!r}; choose one of {list(SPLITS)}")
        if self.splits_path is None:
            raise DataError(
                "NYUv2 splits need splits.mat (the official 795/654 train/test split with trainNdxs and testNdxs); "
                "pass splits_path"
            )
        one_based = _load_v5(self.splits_path, _SPLIT_KEYS[name]).astype(np.int64).reshape(-1)
        if one_based.size and (one_based.min() < 1 or one_based.max() > self._count):
            raise DataError(
                f"{self.splits_path}: {_SPLIT_KEYS[name]} holds frame numbers {one_based.min()}..{one_based.max()}, "
                f"but {self.mat_path} has {self._count} frames (numbers are 1-based); the files do not belong together"
            )
        return one_based - 1

    def _label_lookup(self, classes: int) -> np.ndarray:
        if classes in self._mappings:
            return self._mappings[classes]
        map40 = self._mapping_40()  # [894] values 1..40
        if classes == 40:
            mapped = map40
        else:
            map13 = self._mapping_13()  # [40] values 1..13
            mapped = map13[map40 - 1]
        lookup = np.full(NUM_RAW_CLASSES + 1, IGNORE_LABEL, dtype=np.uint8)
        lookup[1:] = mapped - 1  # raw 0 (unlabelled) stays 255
        self._mappings[classes] = lookup
        return lookup

    def _mapping_path(self, classes: int, key: str) -> Path:
        path = self.class_mapping_paths.get(classes)
        if path is None and 0 in self.class_mapping_paths and _has_variable(self.class_mapping_paths[0], key):
            path = self.class_mapping_paths[0]
        if path is None:
            names = {40: "classMapping40.mat", 13: "class13Mapping.mat"}
            raise DataError(
                f"{classes}-class NYUv2 labels need {names[classes]} (variable {key!r}); pass "
                f"class_mapping_path={{40: 'classMapping40.mat', 13: 'class13Mapping.mat'}}"
            )
        return path

    def _mapping_40(self) -> np.ndarray:
        path = self._mapping_path(40, "mapClass")
        mapping = np.asarray(_load_v5(path, "mapClass")).astype(np.int64).reshape(-1)
        if mapping.size != NUM_RAW_CLASSES or mapping.min() < 1 or mapping.max() > 40:
            raise DataError(
                f"{path}: 'mapClass' must map the {NUM_RAW_CLASSES} raw NYUv2 classes to 1..40, got {mapping.size} "
                f"values in {mapping.min()}..{mapping.max()}; use Gupta et al.'s classMapping40.mat"
            )
        return mapping

    def _mapping_13(self) -> np.ndarray:
        path = self._mapping_path(13, "classMapping13")
        struct = _load_v5(path, "classMapping13")
        # The struct holds the 40 -> 13 id map and the 13 names; pick the numeric field of 40 entries rather
        # than trusting a field name or position.
        candidates = []
        record = struct.reshape(-1)[0] if struct.dtype.names else None
        fields = struct.dtype.names or ()
        for field in fields:
            value = np.asarray(record[field])
            if value.dtype.kind in "iuf" and value.size == 40:
                candidates.append(value.astype(np.int64).reshape(-1))
        if len(candidates) != 1 or candidates[0].min() < 1 or candidates[0].max() > 13:
            raise DataError(
                f"{path}: 'classMapping13' must be a struct with one numeric field of 40 values in 1..13 (the "
                f"40 -> 13 class map); found fields {list(fields)}; use the class13Mapping.mat of the NYUv2 toolkits"
            )
        return candidates[0]


def _check_v73(path: Path) -> None:
    """Raise a ``DataError`` unless ``path`` is an HDF5-based (MATLAB v7.3) file."""
    if not path.is_file():
        raise DataError(f"NYUv2 labeled file {path} is missing; download nyu_depth_v2_labeled.mat (2.8 GB)")
    with open(path, "rb") as handle:
        head = handle.read(128)
    import h5py

    if not h5py.is_hdf5(str(path)):
        if head.startswith(b"MATLAB 5.0 MAT-file"):
            raise DataError(
                f"{path} is a MATLAB v5 MAT file, but the NYUv2 labeled set is a MATLAB v7.3 (HDF5) file; "
                "pass nyu_depth_v2_labeled.mat here (splits.mat and the class mappings go to their own arguments)"
            )
        raise DataError(f"{path} is not a MATLAB v7.3 (HDF5) file; expected nyu_depth_v2_labeled.mat")


def _load_v5(path: Path, key: str) -> np.ndarray:
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path} is missing; it is needed for its variable {key!r}")
    try:
        contents = scipy.io.loadmat(str(path), variable_names=[key])
    except NotImplementedError:
        raise DataError(f"{path} is a MATLAB v7.3 file; expected a MATLAB v5 MAT file holding {key!r}") from None
    except (ValueError, OSError, TypeError) as error:
        raise DataError(f"cannot read {path} as a MATLAB MAT file ({error})") from None
    if key not in contents:
        available = sorted(name for name, _, _ in scipy.io.whosmat(str(path)))
        raise DataError(f"{path} has no variable {key!r} (it holds {available})")
    return contents[key]


def _has_variable(path: Path, key: str) -> bool:
    import scipy.io

    try:
        return any(name == key for name, _, _ in scipy.io.whosmat(str(path)))
    except (ValueError, OSError, TypeError, NotImplementedError):
        return False
