"""Write a tiny dataset in nuScenes format that the real nuscenes-devkit loads.

It exists so the nuScenes loader can be tested without the 300 GB dataset: all 13 JSON
tables, a map PNG, JPEG camera images, radar ``.pcd`` files (binary, 43-byte records),
LiDAR ``.pcd.bin`` files (float32 x5) and sweeps chained by ``prev``/``next``. Vehicles,
radar points and LiDAR points are placed at known positions in the keyframe ego frame and
returned by :func:`write_tiny_nuscenes` so tests can check the rasterised BEV cells.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Any, Sequence

import numpy as np
from pyquaternion import Quaternion

from lmdfx.bev.data.nuscenes import RADAR_FIELDS
from lmdfx.errors import LMDError

__all__ = ["write_tiny_nuscenes", "RADAR_FIELDS", "CAMERA_CHANNELS", "RADAR_CHANNELS"]

CAMERA_CHANNELS = (
    "CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT",
)
RADAR_CHANNELS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")

_RADAR_STRUCT = struct.Struct("<" + "".join(f[3] for f in RADAR_FIELDS))  # 43 bytes, no padding

# Sensor mounts in the ego frame (x forward, y left, z up), nuScenes-like:
# (translation, yaw in degrees). Cameras look along their yaw; radars too.
_CAMERA_MOUNTS = {
    "CAM_FRONT": ((1.70, 0.02, 1.51), 0.0),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0),
    "CAM_FRONT_RIGHT": ((1.52, -0.49, 1.51), -55.0),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0),
    "CAM_BACK": ((0.03, 0.00, 1.57), 180.0),
    "CAM_BACK_RIGHT": ((1.04, -0.48, 1.56), -110.0),
}
_RADAR_MOUNTS = {
    "RADAR_FRONT": ((3.41, 0.0, 0.50), 0.0),
    "RADAR_FRONT_LEFT": ((2.42, 0.80, 0.50), 90.0),
    "RADAR_FRONT_RIGHT": ((2.42, -0.80, 0.50), -90.0),
    "RADAR_BACK_LEFT": ((-0.56, 0.61, 0.50), 180.0),
    "RADAR_BACK_RIGHT": ((-0.56, -0.61, 0.50), 180.0),
}
_LIDAR_MOUNT = ((0.94, 0.0, 1.84), -90.0)
_FULL_IMAGE = (1600, 900)  # nuScenes camera resolution the intrinsics refer to


def _token(*parts: Any) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _yaw_quat(yaw_rad: float) -> Quaternion:
    return Quaternion(axis=(0.0, 0.0, 1.0), angle=yaw_rad)


def _camera_quat(yaw_deg: float) -> Quaternion:
    # camera axes (x right, y down, z forward) expressed in a forward-looking ego frame,
    # then turned by the mount yaw about the ego z axis
    base = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return _yaw_quat(math.radians(yaw_deg)) * Quaternion(matrix=base)


def _pose_matrix(translation: Sequence[float], q: Quaternion) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = q.rotation_matrix
    m[:3, 3] = translation
    return m


def _write_radar_pcd(path: str, points: np.ndarray) -> None:
    """Write [N, 18] radar points as a binary PCD the devkit's RadarPointCloud reads."""
    n = len(points)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION 0.7\n"
        "FIELDS " + " ".join(f[0] for f in RADAR_FIELDS) + "\n"
        "SIZE " + " ".join(str(f[1]) for f in RADAR_FIELDS) + "\n"
        "TYPE " + " ".join(f[2] for f in RADAR_FIELDS) + "\n"
        "COUNT " + " ".join("1" for _ in RADAR_FIELDS) + "\n"
        f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary\n"
    )
    body = bytearray()
    for p in points:
        vals = [float(v) if f[2] == "F" else int(round(v)) for v, f in zip(p, RADAR_FIELDS)]
        body += _RADAR_STRUCT.pack(*vals)
    # the devkit asserts end < len(data) for every field, so one byte must follow the last record
    body += b"\n"
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(bytes(body))


def _radar_fields(rng: np.random.Generator) -> list[float]:
    """15 plausible field values (after x, y, z); integers where the pcd type is I."""
    return [
        float(rng.integers(0, 8)), float(rng.integers(0, 200)), float(np.round(rng.uniform(-5, 20), 2)),
        float(np.round(rng.uniform(-3, 3), 2)), float(np.round(rng.uniform(-3, 3), 2)),
        float(np.round(rng.uniform(-3, 3), 2)), float(np.round(rng.uniform(-3, 3), 2)),
        1.0, 3.0, float(rng.integers(0, 20)), float(rng.integers(0, 20)), 0.0, 1.0,
        float(rng.integers(0, 20)), float(rng.integers(0, 20)),
    ]


def write_tiny_nuscenes(
    root: str | os.PathLike,
    version: str = "v1.0-mini",
    scenes: int = 2,
    samples_per_scene: int = 3,
    sweeps_per_sample: int = 2,
    image_size: tuple[int, int] = (160, 90),
    seed: int = 0,
) -> dict:
    """Write a tiny nuScenes-format dataset under ``root`` and return what it placed where.

    Scenes are named from the devkit's mini splits (scene-0061, scene-0103, ...; the first half
    mini_train, the rest mini_val for ``v1.0-mini``; train/val scenes for ``v1.0-trainval``), so
    ``create_splits_scenes()`` selects them. ``image_size`` is (W, H) of the JPEGs; intrinsics
    are nuScenes-like and scaled to it. Radar and LiDAR get ``sweeps_per_sample`` non-key sweeps
    before each keyframe. The ego drives along a straight line with a fixed heading.

    Returns a dict with ``version``, ``dataroot``, ``scene_names``, ``calibration``
    (channel -> ego_T_sensor 4x4 list) and ``samples``: per keyframe sample its ``token``,
    ``scene``, ``timestamp``, ``vehicles`` (``center_ego``, ``size`` (w, l, h), ``yaw_ego``,
    ``category``, ``visibility``), ``others`` (non-vehicle boxes), ``radar_points``
    (``channel``, ``ego_xyz``, ``fields`` = the 15 values after x, y, z) and ``lidar_points``
    (``ego_xyz``); all ``*_ego`` positions are in that sample's keyframe ego frame.
    """
    root = os.fspath(root)
    if scenes < 1 or samples_per_scene < 1 or sweeps_per_sample < 0:
        raise LMDError("write_tiny_nuscenes needs scenes >= 1, samples_per_scene >= 1, sweeps_per_sample >= 0.")
    if version == "v1.0-mini":
        from nuscenes.utils.splits import mini_train, mini_val

        n_train = (scenes + 1) // 2
        pool_train, pool_val = list(mini_train), list(mini_val)
    elif version == "v1.0-trainval":
        from nuscenes.utils.splits import train, val

        n_train = (scenes + 1) // 2
        pool_train, pool_val = list(train), list(val)
    else:
        raise LMDError(f"write_tiny_nuscenes supports 'v1.0-mini' and 'v1.0-trainval', not {version!r}.")
    n_val = scenes - n_train
    if n_train > len(pool_train) or n_val > len(pool_val):
        raise LMDError(f"at most {len(pool_train) + len(pool_val)} scenes for {version}; asked {scenes}.")
    scene_names = pool_train[:n_train] + pool_val[:n_val]

    rng = np.random.default_rng(seed)
    table_dir = os.path.join(root, version)
    for sub in ["maps", "samples", "sweeps"]:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    os.makedirs(table_dir, exist_ok=True)

    from PIL import Image

    img_w, img_h = image_size
    tables: dict[str, list] = {name: [] for name in [
        "attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
        "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility"]}

    # -- static tables -----------------------------------------------------------------
    categories = ["vehicle.car", "vehicle.truck", "human.pedestrian.adult"]
    for i, name in enumerate(categories):
        tables["category"].append({"token": _token("category", name), "name": name, "description": name, "index": i})
    for name in ["vehicle.moving", "vehicle.parked", "pedestrian.moving"]:
        tables["attribute"].append({"token": _token("attribute", name), "name": name, "description": name})
    for tok, level in [("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100")]:
        tables["visibility"].append({"token": tok, "level": level, "description": f"visibility {level}"})

    channels = list(CAMERA_CHANNELS) + list(RADAR_CHANNELS) + ["LIDAR_TOP"]
    calib: dict[str, np.ndarray] = {}
    for ch in channels:
        modality = "camera" if ch.startswith("CAM") else ("radar" if ch.startswith("RADAR") else "lidar")
        tables["sensor"].append({"token": _token("sensor", ch), "channel": ch, "modality": modality})
        if modality == "camera":
            t, yaw = _CAMERA_MOUNTS[ch]
            q = _camera_quat(yaw)
            sx, sy = img_w / _FULL_IMAGE[0], img_h / _FULL_IMAGE[1]
            intr = [[1266.4 * sx, 0.0, 816.3 * sx], [0.0, 1266.4 * sy, 491.5 * sy], [0.0, 0.0, 1.0]]
        else:
            t, yaw = _RADAR_MOUNTS[ch] if modality == "radar" else _LIDAR_MOUNT
            q = _yaw_quat(math.radians(yaw))
            intr = []
        calib[ch] = _pose_matrix(t, q)
        tables["calibrated_sensor"].append({
            "token": _token("calibrated_sensor", ch), "sensor_token": _token("sensor", ch),
            "translation": list(t), "rotation": list(q.elements), "camera_intrinsic": intr,
        })

    log_token = _token("log", 0)
    tables["log"].append({"token": log_token, "logfile": "synthetic-log", "vehicle": "n000",
                          "date_captured": "2018-07-24", "location": "singapore-onenorth"})
    map_rel = "maps/synthetic_map.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(os.path.join(root, map_rel))
    tables["map"].append({"token": _token("map", 0), "log_tokens": [log_token], "category": "semantic_prior",
                          "filename": map_rel})

    # -- scenes, samples, sensor data -----------------------------------------------------
    heading = 0.3  # global yaw of the ego (rad)
    speed = 5.0  # m/s along the heading
    key_dt = 0.5  # s between keyframes
    info_samples: list[dict] = []
    prev_sd: dict[str, str] = {}
    t0_us = 1_532_402_927_000_000
    instances: dict[str, dict] = {}

    def ego_pose_at(time_s: float) -> tuple[np.ndarray, Quaternion]:
        start = np.array([300.0, 900.0, 0.0])
        d = np.array([math.cos(heading), math.sin(heading), 0.0]) * speed * time_s
        return start + d, _yaw_quat(heading)

    for si, scene_name in enumerate(scene_names):
        scene_token = _token("scene", scene_name)
        sample_tokens = [_token("sample", scene_name, k) for k in range(samples_per_scene)]
        scene_t0 = 100.0 * si  # seconds; scenes far apart in time
        prev_sd = {ch: "" for ch in channels}
        chain: dict[str, list[dict]] = {ch: [] for ch in channels}
        for k, sample_token in enumerate(sample_tokens):
            t_key = scene_t0 + k * key_dt
            ts_key = t0_us + int(round(t_key * 1e6))
            tables["sample"].append({
                "token": sample_token, "timestamp": ts_key, "scene_token": scene_token,
                "prev": sample_tokens[k - 1] if k > 0 else "",
                "next": sample_tokens[k + 1] if k + 1 < samples_per_scene else "",
            })
            key_pos, key_q = ego_pose_at(t_key)
            global_T_key = _pose_matrix(key_pos, key_q)
            s_info: dict[str, Any] = {"token": sample_token, "scene": scene_name, "timestamp": ts_key,
                                      "vehicles": [], "others": [], "radar_points": [], "lidar_points": []}

            # annotations at known keyframe-ego positions
            boxes = [
                ("vehicle.car", (14.3 + k, 4.7, 0.9), (2.1, 4.6, 1.7), 0.0, "4"),
                ("vehicle.truck", (-11.2, -7.4 - 0.5 * k, 1.4), (3.2, 9.5, 3.0), 0.4, "3"),
                ("vehicle.car", (3.1, 19.6, 0.9), (2.0, 4.4, 1.6), math.pi / 2, "1"),  # barely visible
                ("human.pedestrian.adult", (6.3, -3.9, 0.9), (0.7, 0.7, 1.8), 0.0, "4"),
            ]
            for bi, (cat, c_ego, size, yaw_ego, vis) in enumerate(boxes):
                inst_token = _token("instance", scene_name, bi)
                ann_token = _token("ann", scene_name, k, bi)
                c_glob = global_T_key @ np.array([*c_ego, 1.0])
                q_glob = key_q * _yaw_quat(yaw_ego)
                inst = instances.setdefault(inst_token, {
                    "token": inst_token, "category_token": _token("category", cat), "nbr_annotations": 0,
                    "first_annotation_token": ann_token, "last_annotation_token": ann_token, "anns": []})
                inst["anns"].append(ann_token)
                tables["sample_annotation"].append({
                    "token": ann_token, "sample_token": sample_token, "instance_token": inst_token,
                    "visibility_token": vis, "attribute_tokens": [],
                    "translation": [float(v) for v in c_glob[:3]], "size": list(size),
                    "rotation": list(q_glob.elements),
                    "prev": _token("ann", scene_name, k - 1, bi) if k > 0 else "",
                    "next": _token("ann", scene_name, k + 1, bi) if k + 1 < samples_per_scene else "",
                    "num_lidar_pts": 10, "num_radar_pts": 2,
                })
                entry = {"center_ego": c_ego, "size": size, "yaw_ego": yaw_ego, "category": cat, "visibility": vis}
                (s_info["vehicles"] if cat.startswith("vehicle") else s_info["others"]).append(entry)

            # sensor data: sweeps (radar, lidar) then the keyframe, chained per channel
            for ch in channels:
                is_cam = ch.startswith("CAM")
                n_sweeps = 0 if is_cam else sweeps_per_sample
                for j in range(n_sweeps, -1, -1):  # j sweeps before the keyframe; j == 0 is the keyframe
                    t = t_key - j * key_dt / (sweeps_per_sample + 1)
                    ts = t0_us + int(round(t * 1e6))
                    is_key = j == 0
                    pos, q = ego_pose_at(t)
                    sd_token = _token("sd", scene_name, k, ch, j)
                    pose_token = _token("pose", scene_name, k, ch, j)
                    tables["ego_pose"].append({"token": pose_token, "timestamp": ts,
                                               "translation": [float(v) for v in pos], "rotation": list(q.elements)})
                    folder = "samples" if is_key else "sweeps"
                    os.makedirs(os.path.join(root, folder, ch), exist_ok=True)
                    stem = f"n000-2018-07-24__{ch}__{ts}"
                    # points are specified in the ego frame *at this sweep's time*, then moved to sensor
                    sensor_T_ego = np.linalg.inv(calib[ch])
                    if is_cam:
                        rel = f"{folder}/{ch}/{stem}.jpg"
                        yy, xx = np.mgrid[0:img_h, 0:img_w]
                        arr = np.stack([(xx * 255 // max(img_w - 1, 1)), (yy * 255 // max(img_h - 1, 1)),
                                        np.full_like(xx, (40 * CAMERA_CHANNELS.index(ch) + 30 * k) % 256)], -1)
                        arr = np.clip(arr + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
                        Image.fromarray(arr).save(os.path.join(root, rel), quality=90)
                        fmt, w_, h_ = "jpg", img_w, img_h
                    elif ch.startswith("RADAR"):
                        rel = f"{folder}/{ch}/{stem}.pcd"
                        pts_ego = []
                        fields = []
                        # background clutter far away (> 30 m), so it never shares a voxel with the
                        # known points below
                        yaw_m = math.radians(_RADAR_MOUNTS[ch][1])
                        for _ in range(3):
                            r = rng.uniform(32.0, 45.0)
                            a = yaw_m + rng.uniform(-0.5, 0.5)
                            pts_ego.append((r * math.cos(a), r * math.sin(a), rng.uniform(0.3, 1.0)))
                            fields.append(_radar_fields(rng))
                        if is_key and ch == "RADAR_FRONT":
                            known = (12.95 + k, -2.3, 0.6)
                            f = _radar_fields(rng)
                            pts_ego.append(known)
                            fields.append(f)
                            s_info["radar_points"].append({"channel": ch, "ego_xyz": known, "fields": f})
                        if is_key and ch == "RADAR_BACK_LEFT":
                            known = (-16.1, 8.4, 0.4)
                            f = _radar_fields(rng)
                            pts_ego.append(known)
                            fields.append(f)
                            s_info["radar_points"].append({"channel": ch, "ego_xyz": known, "fields": f})
                        xyz = (sensor_T_ego @ np.c_[np.array(pts_ego), np.ones(len(pts_ego))].T)[:3].T
                        _write_radar_pcd(os.path.join(root, rel), np.c_[xyz, np.array(fields)])
                        fmt, w_, h_ = "pcd", 0, 0
                    else:
                        rel = f"{folder}/{ch}/{stem}.pcd.bin"
                        # a ring of ground returns plus a known post in the keyframe
                        ang = rng.uniform(0, 2 * math.pi, 200)
                        rad = rng.uniform(5.0, 40.0, 200)
                        pts_ego = np.c_[rad * np.cos(ang), rad * np.sin(ang), np.full(200, -0.2)]
                        if is_key:
                            known = np.array([[-7.4, 13.9, 1.0]])
                            pts_ego = np.r_[pts_ego, known]
                            s_info["lidar_points"].append({"ego_xyz": tuple(known[0])})
                        xyz = (sensor_T_ego @ np.c_[pts_ego, np.ones(len(pts_ego))].T)[:3].T
                        extra = np.c_[rng.uniform(0, 100, len(xyz)), rng.integers(0, 32, len(xyz))]
                        np.c_[xyz, extra].astype(np.float32).tofile(os.path.join(root, rel))
                        fmt, w_, h_ = "pcd", 0, 0
                    rec = {
                        "token": sd_token, "sample_token": sample_token, "ego_pose_token": pose_token,
                        "calibrated_sensor_token": _token("calibrated_sensor", ch), "timestamp": ts,
                        "fileformat": fmt, "is_key_frame": is_key, "height": h_, "width": w_,
                        "filename": rel, "prev": prev_sd[ch], "next": "",
                    }
                    if chain[ch]:
                        chain[ch][-1]["next"] = sd_token
                    chain[ch].append(rec)
                    prev_sd[ch] = sd_token
            info_samples.append(s_info)
        for ch in channels:
            tables["sample_data"].extend(chain[ch])
        tables["scene"].append({
            "token": scene_token, "log_token": log_token, "nbr_samples": samples_per_scene,
            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
            "name": scene_name, "description": "synthetic scene written by lmdfx",
        })

    for inst in instances.values():
        anns = inst.pop("anns")
        inst.update(nbr_annotations=len(anns), first_annotation_token=anns[0], last_annotation_token=anns[-1])
        tables["instance"].append(inst)

    for name, rows in tables.items():
        with open(os.path.join(table_dir, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)

    return {
        "version": version,
        "dataroot": root,
        "scene_names": scene_names,
        "image_size": (img_w, img_h),
        "calibration": {ch: calib[ch].tolist() for ch in channels},
        "samples": info_samples,
    }
