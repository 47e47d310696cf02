"""A synthetic sensor world: vehicles on a BEV grid seen by a 6-camera ring and a radar.

Each scene places vehicles (oriented boxes) around the ego rig and renders them into exactly
the forward arguments of :class:`lmdfx.bev.models.simplebev.SimpleBEV`:

- cameras: the rig of :func:`lmdfx.bev.models.simplebev.ring_rig` (the same calibration the lifting
  grids come from); sky and road background, each vehicle painted as the convex hull of its
  projected box (coloured body, dark lower band), far to near, plus a few poles that are not
  vehicles;
- radar: a few returns per sweep on the side of each vehicle that faces the rig, five sweeps with
  their time lag, plus clutter, rasterised with SimpleBEV's metaradar layout
  (:func:`lmdfx.bev.data.nuscenes.rasterize_radar`).

Every vehicle draws which sensors may see it: most are seen by both, some by the camera only (low
radar cross-section: no radar returns), some by the radar only (night, fog: not painted). After
rendering, ``seen_by`` records what each sensor actually observed (a painted vehicle hidden
behind nearer ones is not seen by the camera). Items are dicts like those of
:class:`lmdfx.bev.data.nuscenes.NuScenesBEVDataset`: forward arguments plus ``vehicle_gt`` and
``valid_mask`` (0 on vehicles no sensor saw). Scene ``i`` of a world depends only on
``(seed, i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from lmdfx.errors import LMDError
from lmdfx.bev.models.simplebev import METARADAR_FEATURES, SimpleBEVConfig, lifting_grids, ring_rig

__all__ = [
    "SENSORS",
    "world_config",
    "WorldObject",
    "Scene",
    "SensorWorld",
]

#: Sensors of the world, named like the SimpleBEV modalities they feed.
SENSORS = ("camera", "radar")
#: Ground plane in the reference (camera) frame: y points down, cameras sit 1.5 m above the road.
GROUND_Y = 1.5
#: Height of the radar returns (radars are mounted ~0.5 m above the road).
RADAR_Y = 1.0
#: Time between radar sweeps in seconds (nuScenes radars run at ~13 Hz).
SWEEP_DT = 0.075
#: Fewest visible pixels (over all cameras) for a vehicle to count as seen by the camera.
MIN_CAMERA_PIXELS = 24

_PALETTE = np.array([
    [0.85, 0.10, 0.10], [0.10, 0.25, 0.85], [0.95, 0.80, 0.05], [0.05, 0.65, 0.20],
    [0.90, 0.45, 0.05], [0.60, 0.10, 0.70], [0.05, 0.75, 0.80], [0.95, 0.95, 0.95],
])


def world_config(**overrides: Any) -> SimpleBEVConfig:
    """The sensor world's SimpleBEV config: tiny() with 64x128 images and a 40 m x 40 m grid.

    32 x 8 x 32 voxels of 1.25 m (8 height bins as in SimpleBEV), ResNet-18 encoder, latent 16,
    camera + metaradar.
    """
    base = dict(image_size=(64, 128), grid=(32, 8, 32), bounds=(-20.0, 20.0, -4.0, 6.0, -20.0, 20.0))
    base.update(overrides)
    return SimpleBEVConfig.tiny(**base)


@dataclass
class WorldObject:
    """One vehicle of a scene, in the reference frame (x right, y down, z forward), metres."""

    center: tuple[float, float]  # (x, z) of the footprint centre
    size: tuple[float, float, float]  # (length, width, height)
    yaw: float  # heading in the x-z plane, radians
    visible_to: tuple[str, ...]  # sensors the vehicle was drawn to be visible to
    seen_by: tuple[str, ...]  # sensors that actually observed it after rendering
    camera_pixels: int
    radar_points: int
    mask: np.ndarray = field(repr=False)  # [Z, X] bool footprint on the BEV grid

    @property
    def single_sensor(self) -> Optional[str]:
        """The one sensor that saw the vehicle, or None when zero or both did."""
        return self.seen_by[0] if len(self.seen_by) == 1 else None


@dataclass
class Scene:
    """A rendered scene: forward arguments (no batch dim), ground truth and the vehicles."""

    inputs: dict[str, torch.Tensor]
    vehicle_gt: torch.Tensor  # [1, Z, X]
    valid_mask: torch.Tensor  # [1, Z, X]
    objects: list[WorldObject]

    def item(self) -> dict[str, torch.Tensor]:
        """Forward arguments plus ``vehicle_gt`` and ``valid_mask``, as dataset items are."""
        return {**self.inputs, "vehicle_gt": self.vehicle_gt, "valid_mask": self.valid_mask}


# ---------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------
def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull (monotone chain) of 2-D points [N, 2]."""
    pts = sorted(set(map(tuple, np.round(points, 9))))
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64)

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (
                    out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _fill_convex(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Bool mask [H, W] of the cells whose centre (col, row) lies in the hull of ``points`` [N, 2]."""
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    hull = _convex_hull(points)
    if len(hull) < 3:
        return mask
    c0, c1 = max(int(np.floor(hull[:, 0].min())), 0), min(int(np.ceil(hull[:, 0].max())), w - 1)
    r0, r1 = max(int(np.floor(hull[:, 1].min())), 0), min(int(np.ceil(hull[:, 1].max())), h - 1)
    if c0 > c1 or r0 > r1:
        return mask
    cc, rr = np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1))
    inside = np.ones(cc.shape, dtype=bool)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (b[0] - a[0]) * (rr - a[1]) - (b[1] - a[1]) * (cc - a[0]) >= -1e-9
    mask[r0:r1 + 1, c0:c1 + 1] = inside
    return mask


def _footprint(center: Sequence[float], length: float, width: float, yaw: float) -> np.ndarray:
    """The four (x, z) corners of a box footprint."""
    c, s = math.cos(yaw), math.sin(yaw)
    along, across = np.array([c, s]), np.array([-s, c])
    corners = [(+1, +1), (+1, -1), (-1, -1), (-1, +1)]
    return np.array([np.asarray(center) + a * length / 2 * along + b * width / 2 * across for a, b in corners])


class _Rig:
    """Calibration of the world: camera matrices, grid geometry and the lifting grids."""

    def __init__(self, config: SimpleBEVConfig):
        self.config = config
        intr, cam_to_ref = ring_rig(config)
        self.intrinsics = intr.numpy()
        self.ref_to_cam = np.linalg.inv(cam_to_ref.numpy())
        grid, valid = lifting_grids(config, intr, cam_to_ref)
        self.lift_grid, self.lift_valid = grid, valid

    def bev_cells(self, xz: np.ndarray) -> np.ndarray:
        """(x, z) metres -> (col, row) in BEV cell units (cell centres at integers)."""
        xmin, _, _, _, zmin, _ = self.config.bounds
        dx, _, dz = self.config.voxel_size
        return np.stack([(xz[:, 0] - xmin) / dx - 0.5, (xz[:, 1] - zmin) / dz - 0.5], axis=1)

    def project(self, cam: int, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference-frame points [N, 3] -> pixel (u, v) [N, 2] and depth [N] in camera ``cam``."""
        m = self.ref_to_cam[cam]
        pc = xyz @ m[:3, :3].T + m[:3, 3]
        k = self.intrinsics[cam]
        depth = pc[:, 2]
        safe = np.where(depth > 1e-6, depth, 1e-6)
        uv = np.stack([k[0, 0] * pc[:, 0] / safe + k[0, 2], k[1, 1] * pc[:, 1] / safe + k[1, 2]], axis=1)
        return uv, depth


# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------
class SensorWorld(torch.utils.data.Dataset):
    """``num_scenes`` deterministic scenes (scene i depends only on ``(seed, i)``).

    ``p_camera_only`` / ``p_radar_only``: chance that a vehicle is drawn visible to that sensor
    only (the rest are visible to both). ``vehicles``: (min, max) vehicles per scene.
    ``config`` must have camera and radar modalities (metaradar or occupancy radar).
    """

    gt_keys = ("vehicle_gt", "valid_mask")

    def __init__(
        self,
        num_scenes: int = 64,
        seed: int = 0,
        config: Optional[SimpleBEVConfig] = None,
        p_camera_only: float = 0.2,
        p_radar_only: float = 0.2,
        vehicles: tuple[int, int] = (3, 8),
        clutter: tuple[int, int] = (8, 20),
        poles: tuple[int, int] = (0, 3),
    ):
        config = world_config() if config is None else config
        if not isinstance(config, SimpleBEVConfig):
            raise LMDError(f"config must be a SimpleBEVConfig, got {type(config).__name__}.")
        if tuple(config.modalities) != SENSORS:
            raise LMDError(f"the sensor world renders camera and radar; config.modalities is "
                           f"{config.modalities}: use a config with modalities=('camera', 'radar').")
        if num_scenes < 1:
            raise LMDError(f"num_scenes must be >= 1, got {num_scenes}.")
        if not (0 <= p_camera_only and 0 <= p_radar_only and p_camera_only + p_radar_only <= 1):
            raise LMDError(f"p_camera_only={p_camera_only} and p_radar_only={p_radar_only} must be "
                           "non-negative and sum to at most 1.")
        if not 0 <= vehicles[0] <= vehicles[1]:
            raise LMDError(f"vehicles must be (min, max) with 0 <= min <= max, got {vehicles}.")
        self.num_scenes = int(num_scenes)
        self.seed = int(seed)
        self.config = config
        self.p_camera_only = float(p_camera_only)
        self.p_radar_only = float(p_radar_only)
        self.vehicles = tuple(vehicles)
        self.clutter = tuple(clutter)
        self.poles = tuple(poles)
        self.rig = _Rig(config)

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.scene(index).item()

    @staticmethod
    def forward_kwargs(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The item (or collated batch) without the ground-truth keys."""
        return {k: v for k, v in item.items() if k not in SensorWorld.gt_keys}

    # -- generation ------------------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(index), 0x5EB]))

    def _place(self, rng: np.random.Generator) -> list[dict]:
        xmin, xmax, _, _, zmin, zmax = self.config.bounds
        n = int(rng.integers(self.vehicles[0], self.vehicles[1] + 1))
        placed: list[dict] = []
        tries = 0
        while len(placed) < n and tries < 200:
            tries += 1
            x, z = rng.uniform(xmin + 2.5, xmax - 2.5), rng.uniform(zmin + 2.5, zmax - 2.5)
            if math.hypot(x, z + 0.5) < 5.0:  # keep clear of the rig (centre 0.5 m behind cam0)
                continue
            length, width, height = rng.uniform(3.8, 5.2), rng.uniform(1.7, 2.1), rng.uniform(1.4, 2.0)
            if any(math.hypot(x - o["center"][0], z - o["center"][1]) < (length + o["size"][0]) / 2 + 0.8
                   for o in placed):
                continue
            u = rng.uniform()
            if u < self.p_camera_only:
                visible = ("camera",)
            elif u < self.p_camera_only + self.p_radar_only:
                visible = ("radar",)
            else:
                visible = SENSORS
            moving = rng.uniform() < 0.5
            placed.append(dict(
                center=(x, z), size=(length, width, height), yaw=rng.uniform(-math.pi, math.pi),
                visible=visible, color=_PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.75, 1.0),
                speed=rng.uniform(2.0, 12.0) if moving else 0.0,
            ))
        return placed

    def _render_cameras(self, rng: np.random.Generator, vehicles: list[dict],
                        poles: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        h, w = cfg.image_size
        s = cfg.num_cameras
        horizon = self.rig.intrinsics[0][1, 2]
        rows = np.arange(h)[:, None]
        sky = np.array([0.55, 0.70, 0.90]) * rng.uniform(0.8, 1.1)
        road = np.array([0.42, 0.42, 0.40]) * rng.uniform(0.8, 1.1)
        images = np.zeros((s, h, w, 3))
        ids = np.full((s, h, w), -1, dtype=np.int64)
        # painter's algorithm: draw far to near, keep which vehicle owns each pixel
        things = [(math.hypot(*v["center"]), "vehicle", i) for i, v in enumerate(vehicles) if "camera" in v["visible"]]
        things += [(math.hypot(*p), "pole", j) for j, p in enumerate(poles)]
        things.sort(key=lambda t: -t[0])
        for cam in range(s):
            fade = np.clip((rows - horizon) / (h - horizon), 0, 1)[..., None]
            img = np.where(rows[..., None] < horizon, sky * (1 - 0.3 * rows[..., None] / max(horizon, 1)),
                           road * (0.8 + 0.4 * fade))
            img = np.broadcast_to(img, (h, w, 3)).copy()
            for _, kind, i in things:
                if kind == "vehicle":
                    v = vehicles[i]
                    length, width, height = v["size"]
                    foot = _footprint(v["center"], length, width, v["yaw"])
                    bands = ((GROUND_Y - height, GROUND_Y - 0.3 * height, v["color"]),
                             (GROUND_Y - 0.3 * height, GROUND_Y, v["color"] * 0.25))
                else:
                    x, z = poles[i]
                    foot = _footprint((x, z), 0.3, 0.3, 0.0)
                    bands = ((GROUND_Y - 3.5, GROUND_Y, np.array([0.25, 0.20, 0.15])),)
                for y0, y1, colour in bands:
                    corners = np.array([[fx, y, fz] for fx, fz in foot for y in (y0, y1)])
                    uv, depth = self.rig.project(cam, corners)
                    if (depth < 0.3).any():
                        continue  # behind or at this camera: a neighbouring camera shows it
                    mask = _fill_convex((h, w), uv)
                    img[mask] = colour
                    ids[cam][mask] = i if kind == "vehicle" else -1
            images[cam] = img
        images += rng.normal(0.0, 0.03, size=images.shape)
        images = np.clip(images, 0.0, 1.0) - 0.5
        return images.transpose(0, 3, 1, 2).astype(np.float32), ids

    def _radar(self, rng: np.random.Generator, vehicles: list[dict],
               poles: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        cfg = self.config
        xmin, xmax, _, _, zmin, zmax = cfg.bounds
        xyz, feats, counts = [], [], []
        sweeps = max(cfg.radar_sweeps, 1)

        def point(x, y, z, rcs, vx, vz, lag, dyn, ident, rms):
            xyz.append((x, y, z))
            # the 15 devkit fields after x, y, z, then the time lag (see METARADAR_FEATURES)
            feats.append((dyn, ident, rcs, vx, vz, vx, vz, 1.0, 3.0, rms, rms, 0.0, 1.0, 3.0, 3.0, lag))

        for i, v in enumerate(vehicles):
            if "radar" not in v["visible"]:
                counts.append(0)
                continue
            length, width, _ = v["size"]
            heading = np.array([math.cos(v["yaw"]), math.sin(v["yaw"])])
            vel = v["speed"] * heading
            n = 0
            for sweep in range(sweeps):
                lag = sweep * SWEEP_DT
                centre = np.asarray(v["center"]) - vel * lag
                foot = _footprint(centre, length, width, v["yaw"])
                # returns come from the side facing the rig: the two nearest corners' edges
                near = np.argsort(np.hypot(foot[:, 0], foot[:, 1] + 0.5))[:3]
                for _ in range(int(rng.integers(1, 4))):
                    a, b = foot[near[0]], foot[near[int(rng.integers(1, 3))]]
                    p = a + rng.uniform() * (b - a) + rng.normal(0.0, 0.15, 2)
                    point(p[0], RADAR_Y + rng.normal(0.0, 0.2), p[1], rng.normal(10.0, 3.0), vel[0], vel[1],
                          lag, 0.0 if v["speed"] > 0 else 1.0, float(i % 16), 5.0)
                    n += 1
            counts.append(n)
        for x, z in poles:  # poles are strong static reflectors: they make radar alone ambiguous
            point(x, RADAR_Y, z, rng.normal(6.0, 2.0), 0.0, 0.0, 0.0, 1.0, 0.0, 5.0)
        for _ in range(int(rng.integers(self.clutter[0], self.clutter[1] + 1))):
            point(rng.uniform(xmin, xmax), RADAR_Y + rng.normal(0.0, 0.5), rng.uniform(zmin, zmax),
                  rng.normal(-5.0, 4.0), rng.normal(0, 0.3), rng.normal(0, 0.3),
                  SWEEP_DT * int(rng.integers(sweeps)), 1.0, 0.0, 10.0)
        return np.array(xyz, dtype=np.float64).reshape(-1, 3), np.array(feats, dtype=np.float64).reshape(
            -1, METARADAR_FEATURES), counts

    def scene(self, index: int) -> Scene:
        """Render scene ``index`` (0 <= index < len(self))."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene {index} out of range for a world of {self.num_scenes} scenes")
        from lmdfx.bev.data.nuscenes import rasterize_radar

        cfg = self.config
        rng = self._rng(index)
        vehicles = self._place(rng)
        xmin, xmax, _, _, zmin, zmax = cfg.bounds
        poles = []
        for _ in range(int(rng.integers(self.poles[0], self.poles[1] + 1))):
            x, z = rng.uniform(xmin + 1, xmax - 1), rng.uniform(zmin + 1, zmax - 1)
            if math.hypot(x, z + 0.5) > 5.0 and all(
                    math.hypot(x - v["center"][0], z - v["center"][1]) > v["size"][0] / 2 + 1.0 for v in vehicles):
                poles.append((x, z))
        images, ids = self._render_cameras(rng, vehicles, poles)
        xyz, feats, counts = self._radar(rng, vehicles, poles)
        radar = rasterize_radar(cfg, xyz, feats)
        z_n, _, x_n = cfg.grid
        objects = []
        gt = np.zeros((z_n, x_n), dtype=bool)
        unseen = np.zeros((z_n, x_n), dtype=bool)
        for i, v in enumerate(vehicles):
            length, width, _ = v["size"]
            mask = _fill_convex((z_n, x_n), self.rig.bev_cells(_footprint(v["center"], length, width, v["yaw"])))
            pixels = int((ids == i).sum())
            seen = tuple(s for s, ok in (("camera", pixels >= MIN_CAMERA_PIXELS), ("radar", counts[i] > 0)) if ok)
            objects.append(WorldObject(center=tuple(v["center"]), size=tuple(v["size"]), yaw=float(v["yaw"]),
                                       visible_to=v["visible"], seen_by=seen, camera_pixels=pixels,
                                       radar_points=counts[i], mask=mask))
            gt |= mask
            if not seen:
                unseen |= mask
        inputs = {
            "images": torch.from_numpy(images),
            "lift_grid": self.rig.lift_grid,
            "lift_valid": self.rig.lift_valid,
            "radar_bev": torch.from_numpy(radar),
        }
        return Scene(inputs=inputs, vehicle_gt=torch.from_numpy(gt.astype(np.float32))[None],
                     valid_mask=torch.from_numpy((~unseen).astype(np.float32))[None], objects=objects)
