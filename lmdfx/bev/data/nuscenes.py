"""nuScenes -> SimpleBEV inputs, built on the official nuscenes-devkit.

:class:`NuScenesBEVDataset` returns, per keyframe sample, exactly the keyword arguments of
:meth:`lmdfx.bev.models.simplebev.SimpleBEV.forward` (without the batch dimension) plus the
ground truth ``vehicle_gt`` and ``valid_mask``. Preprocessing follows SimpleBEV's loader:
images resized to the config size, radar from 5 radars x N sweeps chained via ``prev`` with
points closer than 2.2 m dropped and moved into the keyframe ego frame, vehicle ground truth =
footprints of annotations whose category contains "vehicle", all in the CAM_FRONT (cam0) frame.
"""

from __future__ import annotations

import json
import os
import struct
from functools import partial, reduce
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from lmdfx.errors import LMDError
from lmdfx.bev.models.simplebev import METARADAR_FEATURES, SimpleBEVConfig, lifting_grids

__all__ = [
    "NuScenesBEVDataset",
    "CAMERAS",
    "REF_CAMERA",
    "RADARS",
    "SPLITS",
    "GT_KEYS",
    "TABLES",
    "RADAR_FIELDS",
    "voxel_indices",
    "rasterize_radar",
    "rasterize_occupancy",
    "rasterize_footprints",
]

#: Camera order of SimpleBEV's loader.
CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
#: The reference (cam0) camera whose frame holds the voxel grid.
REF_CAMERA = "CAM_FRONT"
#: Radar order of SimpleBEV's loader (points are concatenated in this order).
RADARS = ("RADAR_BACK_RIGHT", "RADAR_BACK_LEFT", "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT")
#: Splits each version offers (names of ``create_splits_scenes()``).
SPLITS = {
    "v1.0-trainval": ("train", "val"),
    "v1.0-mini": ("mini_train", "mini_val"),
    "v1.0-test": ("test",),
}
#: Item keys that are ground truth, not forward arguments.
GT_KEYS = ("vehicle_gt", "valid_mask")
#: The 13 JSON tables of a version folder, in the order the devkit loads them.
TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")
#: (name, size in bytes, pcd type, struct code) of the 18 fields of a nuScenes radar PCD record.
RADAR_FIELDS = (
    ("x", 4, "F", "f"), ("y", 4, "F", "f"), ("z", 4, "F", "f"),
    ("dyn_prop", 1, "I", "b"), ("id", 2, "I", "h"), ("rcs", 4, "F", "f"),
    ("vx", 4, "F", "f"), ("vy", 4, "F", "f"), ("vx_comp", 4, "F", "f"), ("vy_comp", 4, "F", "f"),
    ("is_quality_valid", 1, "I", "b"), ("ambig_state", 1, "I", "b"), ("x_rms", 1, "I", "b"),
    ("y_rms", 1, "I", "b"), ("invalid_state", 1, "I", "b"), ("pdh0", 1, "I", "b"),
    ("vx_rms", 1, "I", "b"), ("vy_rms", 1, "I", "b"),
)
_NO_FILTER = dict(invalid_states=list(range(18)), dynprop_states=list(range(8)), ambig_states=list(range(5)))


# ---------------------------------------------------------------------------
# Rasterisation helpers (numpy, deterministic)
# ---------------------------------------------------------------------------
def voxel_indices(config: SimpleBEVConfig, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel (z, y, x) indices of reference-frame points [N, 3] and an in-bounds mask [N].

    A point belongs to the voxel whose half-open interval [min + i*d, min + (i+1)*d) holds it.
    """
    z_n, y_n, x_n = config.grid
    xmin, xmax, ymin, ymax, zmin, zmax = config.bounds
    dx, dy, dz = config.voxel_size
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    ix = np.floor((xyz[:, 0] - xmin) / dx).astype(np.int64)
    iy = np.floor((xyz[:, 1] - ymin) / dy).astype(np.int64)
    iz = np.floor((xyz[:, 2] - zmin) / dz).astype(np.int64)
    inb = (ix >= 0) & (ix < x_n) & (iy >= 0) & (iy < y_n) & (iz >= 0) & (iz < z_n)
    return np.stack([iz, iy, ix], axis=1), inb


def rasterize_occupancy(config: SimpleBEVConfig, xyz: np.ndarray) -> np.ndarray:
    """Binary occupancy [Z, Y, X] of reference-frame points [N, 3]."""
    z_n, y_n, x_n = config.grid
    occ = np.zeros((z_n, y_n, x_n), dtype=np.float32)
    idx, inb = voxel_indices(config, xyz)
    idx = idx[inb]
    occ[idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return occ


def rasterize_radar(config: SimpleBEVConfig, xyz: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Radar BEV tensor from reference-frame points [N, 3] and their 16 features [N, 16].

    ``metaradar``: [16*Y, Z, X] with channel f*Y + y holding the features of one point per
    voxel: the newest point wins (smallest time lag, the last feature column), ties go to the
    later point in input order. (SimpleBEV writes in a random order; this is its deterministic
    counterpart.) ``occupancy``: [1, Z, X], 1 where any point falls in the column.
    """
    z_n, y_n, x_n = config.grid
    if config.radar_mode == "occupancy":
        occ = rasterize_occupancy(config, xyz).max(axis=1)  # sum over Y clamped to [0, 1]
        return occ[None]
    feats = np.asarray(feats, dtype=np.float64).reshape(-1, METARADAR_FEATURES)
    vox = np.zeros((METARADAR_FEATURES, z_n, y_n, x_n), dtype=np.float32)
    idx, inb = voxel_indices(config, xyz)
    idx, feats = idx[inb], feats[inb]
    if len(idx):
        # write order: oldest first, then input order; the last write per voxel wins
        order = np.lexsort((np.arange(len(idx)), -feats[:, -1]))
        flat = np.ravel_multi_index((idx[order, 0], idx[order, 1], idx[order, 2]), (z_n, y_n, x_n))
        rev_flat = flat[::-1]
        _, first_in_rev = np.unique(rev_flat, return_index=True)
        winners = order[::-1][first_in_rev]
        vox[:, idx[winners, 0], idx[winners, 1], idx[winners, 2]] = feats[winners].T
    # fold Y into channels as f*Y + y, the layout of the original's permute(0,1,3,2,4)
    return vox.transpose(0, 2, 1, 3).reshape(METARADAR_FEATURES * y_n, z_n, x_n)


def rasterize_footprints(config: SimpleBEVConfig, polygons: list[np.ndarray]) -> np.ndarray:
    """[Z, X] mask of cells whose centre lies inside any polygon of (x, z) reference coords."""
    from matplotlib.path import Path

    z_n, _, x_n = config.grid
    xmin, _, _, _, zmin, _ = config.bounds
    dx, _, dz = config.voxel_size
    out = np.zeros((z_n, x_n), dtype=bool)
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        # only test the cells under the polygon's bounding box (fast on 200x200 grids)
        x0 = max(int(np.floor((poly[:, 0].min() - xmin) / dx)), 0)
        x1 = min(int(np.ceil((poly[:, 0].max() - xmin) / dx)), x_n)
        z0 = max(int(np.floor((poly[:, 1].min() - zmin) / dz)), 0)
        z1 = min(int(np.ceil((poly[:, 1].max() - zmin) / dz)), z_n)
        if x0 >= x1 or z0 >= z1:
            continue
        zc = zmin + (np.arange(z0, z1) + 0.5) * dz
        xc = xmin + (np.arange(x0, x1) + 0.5) * dx
        zz, xx = np.meshgrid(zc, xc, indexing="ij")
        inside = Path(poly).contains_points(np.stack([xx.ravel(), zz.ravel()], axis=1))
        out[z0:z1, x0:x1] |= inside.reshape(zz.shape)
    return out


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------
def _check_dataroot(dataroot: str, version: str) -> None:
    if not os.path.isdir(dataroot):
        raise LMDError(
            f"nuScenes dataroot {dataroot!r} does not exist or is not a directory; point dataroot at "
            "the folder that holds samples/, sweeps/, maps/ and the version folders (e.g. v1.0-trainval/)."
        )
    table_dir = os.path.join(dataroot, version)
    if not os.path.isfile(os.path.join(table_dir, "sample.json")):
        found = sorted(
            d for d in os.listdir(dataroot) if os.path.isfile(os.path.join(dataroot, d, "sample.json"))
        )
        raise LMDError(
            f"nuScenes version {version!r} not found in {dataroot!r} (no {version}/sample.json). "
            f"Versions present there: {found or 'none'}. Pass one of them as version=, or extract the "
            "metadata archive of that version into dataroot."
        )


# ---------------------------------------------------------------------------
# Damaged files: say which file and what is wrong instead of the devkit's or PIL's exception
# ---------------------------------------------------------------------------
def _table_problem(path: str) -> Optional[str]:
    """What is wrong with one JSON table, or None when it is a list of records with tokens."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        return "is empty"
    try:
        rows = json.loads(raw)
    except UnicodeDecodeError:
        return "is not UTF-8 text, so not a JSON table"
    except json.JSONDecodeError as exc:
        cut = ", where the file ends: it is truncated" if exc.pos >= len(exc.doc.rstrip()) else ""
        return f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}{cut})"
    if not isinstance(rows, list):
        kind = "object" if isinstance(rows, dict) else type(rows).__name__
        return f"holds a JSON {kind} where a nuScenes table holds a list of records"
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict) or "token" not in row), None)
    if bad is not None:
        return f"has a record without a 'token' at index {bad}, so it is not a nuScenes table"
    return None


def _tables_error(dataroot: str, version: str, exc: Exception) -> LMDError:
    """The error for a devkit that failed to load the tables: the first damaged table, if any."""
    for name in TABLES:
        path = os.path.join(dataroot, version, f"{name}.json")
        problem = _table_problem(path)
        if problem:
            return LMDError(f"nuScenes table {path!r} {problem}; re-extract the metadata archive of {version} "
                            f"into {dataroot!r}.")
    return LMDError(f"the nuscenes-devkit could not load {version} from {dataroot!r} ({type(exc).__name__}: "
                    f"{exc}); re-extract the metadata archive (all 13 JSON tables and maps/).")


#: Header keys of a radar PCD in the order the devkit reads them: by line number, not by key.
_PCD_KEYS = ("#", "VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
_PCD_EXPECTED = {
    "FIELDS": [f[0] for f in RADAR_FIELDS],
    "SIZE": [str(f[1]) for f in RADAR_FIELDS],
    "TYPE": [f[2] for f in RADAR_FIELDS],
    "COUNT": ["1"] * len(RADAR_FIELDS),
    "HEIGHT": ["1"],
    "DATA": ["binary"],
}
_RADAR_RECORD = sum(f[1] for f in RADAR_FIELDS)  # 43 bytes
_LIDAR_RECORD = 5 * 4  # x, y, z, intensity, ring index as float32


def _radar_problem(path: str) -> Optional[str]:
    """What keeps ``path`` from being a radar PCD the devkit decodes correctly, or None."""
    with open(path, "rb") as f:
        rest = f.read()
    if not rest:
        return "is empty (0 bytes)"
    header: dict[str, list[str]] = {}
    for number, key in enumerate(_PCD_KEYS, 1):
        line, newline, rest = rest.partition(b"\n")
        if not newline:
            return f"ends inside the header, before line {number} ({key}): it is truncated or not a PCD file"
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            return f"has binary bytes in header line {number} (not a PCD file, or a damaged header)"
        if not text.startswith(key):
            return f"has {text[:40]!r} as header line {number} where a nuScenes radar PCD has {key}"
        header[key] = text.split()[1:]
    for key, want in _PCD_EXPECTED.items():
        # the devkit decodes by SIZE and TYPE alone: another layout would be read as garbage
        if header[key] != want:
            return f"declares {key} {' '.join(header[key])!r} where a nuScenes radar PCD has {' '.join(want)!r}"
    width = header["WIDTH"]
    if len(width) != 1 or not width[0].isdigit() or int(width[0]) == 0:
        return f"declares WIDTH {' '.join(width)!r} where the (positive) number of points belongs"
    need = int(width[0]) * _RADAR_RECORD
    if len(rest) <= need:  # the devkit asserts that a byte follows every field, the last one included
        return (f"holds {len(rest)} bytes of points where WIDTH {width[0]} records of {_RADAR_RECORD} bytes need "
                f"{need} and one more byte after them: it is truncated")
    return None


def _lidar_problem(path: str) -> Optional[str]:
    """What keeps ``path`` from being a LiDAR sweep of whole points, or None."""
    # np.fromfile silently drops a partial float at the end, so check the byte count here
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    if size % _LIDAR_RECORD:
        return (f"has {size} bytes, not a multiple of {_LIDAR_RECORD} (a point is 5 float32: x, y, z, intensity, "
                "ring): it is truncated or not a nuScenes LiDAR sweep")
    return None


def _read_cloud(kind: str, path: str, problem: Callable[[str], Optional[str]], read: Callable[[str], Any]) -> Any:
    """``read(path)`` (a devkit ``from_file``) after the ``problem`` check; failures name the file."""
    wrong = problem(path)
    if wrong is None:
        try:
            return read(path)
        except (AssertionError, ValueError, IndexError, struct.error) as exc:
            wrong = f"could not be decoded by the nuscenes-devkit ({type(exc).__name__}: {exc})"
    raise LMDError(f"{kind} file {path!r} {wrong}; re-extract it from the nuScenes samples/ or sweeps/ archive.")


def _read_image(path: str, channel: str) -> Any:
    """The RGB image at ``path``, fully decoded; a damaged file raises an LMDError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # decodes every byte, so truncation shows here
    except UnidentifiedImageError:
        wrong = "is not an image PIL can identify (empty, or not a JPEG)"
    except (OSError, SyntaxError, ValueError) as exc:
        wrong = f"could not be decoded ({exc}): it is truncated or damaged"
    raise LMDError(f"{channel} image {path!r} {wrong}; re-extract it from the nuScenes samples/ archive.")


def _check_image_size(path: str, channel: str, sd: dict, intrinsic: Sequence[Sequence[float]],
                      size: tuple[int, int]) -> None:
    """Raise when an image's size disagrees with its sample_data record or its intrinsics."""
    w0, h0 = size
    w_rec, h_rec = sd.get("width") or 0, sd.get("height") or 0
    if w_rec and h_rec and (w_rec, h_rec) != (w0, h0):
        raise LMDError(f"{channel} image {path!r} is {w0}x{h0} pixels but its sample_data record says "
                       f"{w_rec}x{h_rec}, the size its camera intrinsics belong to; re-extract the original image "
                       "(a resized image would be lifted with the wrong geometry).")
    cx, cy = intrinsic[0][2], intrinsic[1][2]
    if not (0 < cx < w0 and 0 < cy < h0):
        raise LMDError(f"the principal point ({cx:.1f}, {cy:.1f}) of the {channel} intrinsics lies outside the "
                       f"{w0}x{h0} image {path!r}: the calibration belongs to another image size; re-extract the "
                       "image and the metadata of the same nuScenes version.")


class NuScenesBEVDataset(torch.utils.data.Dataset):
    """Keyframe samples of one nuScenes split as SimpleBEV inputs and vehicle ground truth.

    Each item is a dict of float32 tensors without batch dimension:
    ``images`` [S,3,H,W] in [-0.5,0.5], ``lift_grid`` [S,Z,Y,X,2], ``lift_valid`` [S,Z,Y,X],
    ``radar_bev`` [16*Y or 1,Z,X] (when radar is a modality), ``lidar_bev`` [Y,Z,X] (when LiDAR
    is), ``vehicle_gt`` [1,Z,X] and ``valid_mask`` [1,Z,X]. :meth:`forward_kwargs` drops the
    ground-truth keys (:data:`GT_KEYS`). Samples are ordered by (scene name, timestamp); nothing
    is random.

    ``valid_mask`` is 1 everywhere except the footprints of vehicles whose visibility token is
    "1" (0-40 % visible), which SimpleBEV excludes from the loss and the IoU.
    """

    gt_keys = GT_KEYS

    def __init__(
        self,
        dataroot: str | os.PathLike,
        version: str,
        split: str,
        config: SimpleBEVConfig,
        nusc: Optional[Any] = None,
    ):
        self.dataroot = os.fspath(dataroot)
        self.version = version
        self.split = split
        self.config = config
        if version not in SPLITS:
            raise LMDError(f"unknown nuScenes version {version!r}; use one of {sorted(SPLITS)}.")
        if split not in SPLITS[version]:
            raise LMDError(f"split {split!r} does not belong to {version}; use one of {SPLITS[version]}.")
        if not isinstance(config, SimpleBEVConfig):
            raise LMDError(f"config must be a SimpleBEVConfig, got {type(config).__name__}.")
        if config.num_cameras != len(CAMERAS):
            raise LMDError(f"nuScenes has {len(CAMERAS)} cameras; config.num_cameras is {config.num_cameras}.")
        if nusc is None:
            _check_dataroot(self.dataroot, version)
            from nuscenes.nuscenes import NuScenes

            try:
                nusc = NuScenes(version=version, dataroot=self.dataroot, verbose=False)
            except FileNotFoundError as exc:
                raise LMDError(
                    f"nuScenes {version} in {self.dataroot!r} is incomplete: {exc}. Re-extract the "
                    "metadata archive (all 13 JSON tables and maps/)."
                ) from exc
            except (ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError) as exc:
                raise _tables_error(self.dataroot, version, exc) from exc
        self.nusc = nusc
        from nuscenes.utils.splits import create_splits_scenes

        scenes = set(create_splits_scenes()[split])
        samples = [s for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]
        samples.sort(key=lambda s: (nusc.get("scene", s["scene_token"])["name"], s["timestamp"]))
        self.samples = samples
        self.sample_tokens = [s["token"] for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    # -- public helpers ---------------------------------------------------------
    @property
    def forward_keys(self) -> tuple[str, ...]:
        """Item keys that are SimpleBEV forward arguments."""
        keys = ["images", "lift_grid", "lift_valid"]
        if "radar" in self.config.modalities:
            keys.append("radar_bev")
        if "lidar" in self.config.modalities:
            keys.append("lidar_bev")
        return tuple(keys)

    @staticmethod
    def forward_kwargs(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The item (or collated batch) without the ground-truth keys."""
        return {k: v for k, v in item.items() if k not in GT_KEYS}

    # -- internals ----------------------------------------------------------------
    def _path(self, sd: dict) -> str:
        path = os.path.join(self.dataroot, sd["filename"])
        if not os.path.isfile(path):
            raise LMDError(
                f"file {sd['filename']!r} of {sd.get('channel', 'sample_data')} (sample_data "
                f"{sd['token']}) is missing under {self.dataroot!r}; extract the samples/ and sweeps/ "
                "archives of this version into dataroot."
            )
        return path

    def _sensor_pose(self, sd: dict) -> tuple[np.ndarray, np.ndarray]:
        """(ego_T_sensor, global_T_ego) 4x4 matrices of one sample_data record."""
        from nuscenes.utils.geometry_utils import transform_matrix
        from pyquaternion import Quaternion

        cs = self.nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = self.nusc.get("ego_pose", sd["ego_pose_token"])
        ego_T_sensor = transform_matrix(cs["translation"], Quaternion(cs["rotation"]))
        global_T_ego = transform_matrix(pose["translation"], Quaternion(pose["rotation"]))
        return ego_T_sensor, global_T_ego

    def _cameras(self, rec: dict) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        from PIL import Image

        h, w = self.config.image_size
        imgs, intrs, poses = [], [], []
        for cam in CAMERAS:
            sd = self.nusc.get("sample_data", rec["data"][cam])
            cs = self.nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            path = self._path(sd)
            im = _read_image(path, cam)
            w0, h0 = im.size
            _check_image_size(path, cam, sd, cs["camera_intrinsic"], im.size)
            # SimpleBEV's eval path: a plain resize to the target size, no crop
            im = im.resize((w, h), resample=Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0 - 0.5
            imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
            k = np.array(cs["camera_intrinsic"], dtype=np.float64)
            k[0] *= w / w0
            k[1] *= h / h0
            intrs.append(k)
            poses.append(self._sensor_pose(sd)[0])
        return torch.stack(imgs), np.stack(intrs), np.stack(poses)

    def _sweeps(self, key_sd: dict, n: int, reader) -> list[tuple[Any, dict]]:
        out, sd = [], key_sd
        for _ in range(n):
            out.append((reader(self._path(sd)), sd))
            if sd["prev"] == "":
                break
            sd = self.nusc.get("sample_data", sd["prev"])
        return out

    def _points_in_ref(
        self, rec: dict, channels: tuple[str, ...], n_sweeps: int, reader, ref_channel: str, ref_T_ego: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points of ``channels`` over ``n_sweeps`` in the reference camera frame, and the rest.

        Sweeps are moved into the ego frame of ``ref_channel``'s keyframe (as SimpleBEV does:
        RADAR_FRONT for radar, LIDAR_TOP for LiDAR). Returns (xyz [N,3], rows [N, F-3+1]:
        the fields after x, y, z plus the time lag in seconds).
        """
        ref_sd = self.nusc.get("sample_data", rec["data"][ref_channel])
        _, global_T_refego = self._sensor_pose(ref_sd)
        refego_T_global = np.linalg.inv(global_T_refego)
        ref_time = 1e-6 * ref_sd["timestamp"]
        xyzs, extras = [], []
        for ch in channels:
            key_sd = self.nusc.get("sample_data", rec["data"][ch])
            for pc, sd in self._sweeps(key_sd, n_sweeps, reader):
                pc.remove_close(self.config.radar_min_distance)
                ego_T_sensor, global_T_ego = self._sensor_pose(sd)
                m = reduce(np.dot, [ref_T_ego, refego_T_global, global_T_ego, ego_T_sensor])
                pts = pc.points
                xyz = (m[:3, :3] @ pts[:3] + m[:3, 3:4]).T
                lag = np.full((pts.shape[1], 1), ref_time - 1e-6 * sd["timestamp"])
                xyzs.append(xyz)
                extras.append(np.concatenate([pts[3:].T, lag], axis=1))
        if not xyzs:
            return np.zeros((0, 3)), np.zeros((0, 1))
        return np.concatenate(xyzs), np.concatenate(extras)

    def _ground_truth(self, rec: dict, ref_T_ego: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from nuscenes.utils.data_classes import Box
        from pyquaternion import Quaternion

        lidar_sd = self.nusc.get("sample_data", rec["data"]["LIDAR_TOP"])
        _, global_T_ego = self._sensor_pose(lidar_sd)
        ego_T_global = np.linalg.inv(global_T_ego)
        m = ref_T_ego @ ego_T_global
        rot = Quaternion(matrix=m[:3, :3], atol=1e-6, rtol=1e-6)
        polys, hidden = [], []
        for tok in rec["anns"]:
            ann = self.nusc.get("sample_annotation", tok)
            if "vehicle" not in ann["category_name"]:
                continue
            box = Box(ann["translation"], ann["size"], Quaternion(ann["rotation"]))
            box.rotate(rot)
            box.translate(m[:3, 3])
            foot = box.bottom_corners()[[0, 2]].T  # (x, z) in the reference camera frame
            polys.append(foot)
            if str(ann["visibility_token"]) == "1":
                hidden.append(foot)
        gt = rasterize_footprints(self.config, polys).astype(np.float32)
        valid = 1.0 - rasterize_footprints(self.config, hidden).astype(np.float32)
        return torch.from_numpy(gt)[None], torch.from_numpy(valid)[None]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud

        cfg = self.config
        rec = self.samples[index]
        images, intr, ego_T_cams = self._cameras(rec)
        ref_i = CAMERAS.index(REF_CAMERA)
        ref_T_ego = np.linalg.inv(ego_T_cams[ref_i])
        cam_to_ref = ref_T_ego[None] @ ego_T_cams
        grid, valid = lifting_grids(cfg, torch.from_numpy(intr), torch.from_numpy(cam_to_ref))
        item: dict[str, torch.Tensor] = {"images": images, "lift_grid": grid, "lift_valid": valid}
        if "radar" in cfg.modalities:
            states = {} if cfg.radar_filters else _NO_FILTER
            read_radar = partial(_read_cloud, "radar", problem=_radar_problem,
                                 read=partial(RadarPointCloud.from_file, **states))
            xyz, extra = self._points_in_ref(rec, RADARS, cfg.radar_sweeps, read_radar, "RADAR_FRONT", ref_T_ego)
            item["radar_bev"] = torch.from_numpy(rasterize_radar(cfg, xyz, extra.reshape(-1, METARADAR_FEATURES)))
        if "lidar" in cfg.modalities:
            read_lidar = partial(_read_cloud, "LiDAR", problem=_lidar_problem, read=LidarPointCloud.from_file)
            xyz, _ = self._points_in_ref(rec, ("LIDAR_TOP",), cfg.lidar_sweeps, read_lidar, "LIDAR_TOP", ref_T_ego)
            occ = rasterize_occupancy(cfg, xyz)  # [Z, Y, X]
            item["lidar_bev"] = torch.from_numpy(np.ascontiguousarray(occ.transpose(1, 0, 2)))
        item["vehicle_gt"], item["valid_mask"] = self._ground_truth(rec, ref_T_ego)
        return item
