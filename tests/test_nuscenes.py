"""nuScenes loader on a tiny dataset written in nuScenes format, plus vehicle IoU."""

from __future__ import annotations

import inspect
import math
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes")

from nuscenes.nuscenes import NuScenes  # noqa: E402

from lmdfx.bev.iou import VehicleIoU, vehicle_iou  # noqa: E402
from lmdfx.bev.data.nuscenes import CAMERAS, NuScenesBEVDataset  # noqa: E402
from lmdfx.bev.data.nuscenes_synthetic import write_tiny_nuscenes  # noqa: E402
from lmdfx.errors import LMDError  # noqa: E402
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig  # noqa: E402

# 1 m cells over +-32 m so the known boxes cover many cells
CFG = SimpleBEVConfig.tiny(
    modalities=("camera", "radar", "lidar"), grid=(64, 4, 64), bounds=(-32.0, 32.0, -4.0, 6.0, -32.0, 32.0)
)


@pytest.fixture(scope="session")
def tiny_nusc(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuscenes")
    info = write_tiny_nuscenes(str(root), version="v1.0-mini", scenes=2, samples_per_scene=3)
    return info


@pytest.fixture(scope="session")
def train_ds(tiny_nusc):
    return NuScenesBEVDataset(tiny_nusc["dataroot"], "v1.0-mini", "mini_train", CFG)


def _ref_T_ego(info) -> np.ndarray:
    return np.linalg.inv(np.array(info["calibration"]["CAM_FRONT"]))


def _cell(cfg, p_ref):
    """(z, y, x) voxel of a reference-frame point, by hand."""
    xmin, _, ymin, _, zmin, _ = cfg.bounds
    dx, dy, dz = cfg.voxel_size
    return (
        int(math.floor((p_ref[2] - zmin) / dz)),
        int(math.floor((p_ref[1] - ymin) / dy)),
        int(math.floor((p_ref[0] - xmin) / dx)),
    )


def test_devkit_loads_tiny_dataset(tiny_nusc):
    nusc = NuScenes(version="v1.0-mini", dataroot=tiny_nusc["dataroot"], verbose=False)
    assert len(nusc.scene) == 2 and len(nusc.sample) == 6
    assert [s["name"] for s in nusc.scene] == ["scene-0061", "scene-0103"]
    sample = nusc.sample[0]
    assert len(sample["data"]) == 12 and len(sample["anns"]) == 4
    # sweeps chained by prev
    sd = nusc.get("sample_data", nusc.sample[1]["data"]["RADAR_FRONT"])
    chain = 0
    while sd["prev"]:
        sd = nusc.get("sample_data", sd["prev"])
        chain += 1
    assert chain == 5  # 2 sweeps + keyframe of sample 0, 2 sweeps of sample 1


def test_splits_and_items(tiny_nusc, train_ds):
    val = NuScenesBEVDataset(tiny_nusc["dataroot"], "v1.0-mini", "mini_val", CFG, nusc=train_ds.nusc)
    assert len(train_ds) == 3 and len(val) == 3
    assert set(train_ds.sample_tokens).isdisjoint(val.sample_tokens)
    item = train_ds[0]
    model = SimpleBEV(CFG)
    params = list(inspect.signature(model.forward).parameters)
    fwd = train_ds.forward_kwargs(item)
    assert set(fwd) == set(train_ds.forward_keys) <= set(params)
    assert set(item) == set(fwd) | {"vehicle_gt", "valid_mask"}
    z, y, x = CFG.grid
    h, w = CFG.image_size
    assert item["images"].shape == (6, 3, h, w)
    assert item["images"].min() >= -0.5 and item["images"].max() <= 0.5
    assert item["lift_grid"].shape == (6, z, y, x, 2) and item["lift_valid"].shape == (6, z, y, x)
    assert item["radar_bev"].shape == (16 * y, z, x)
    assert item["lidar_bev"].shape == (y, z, x)
    assert item["vehicle_gt"].shape == (1, z, x) and item["valid_mask"].shape == (1, z, x)
    assert all(v.dtype == torch.float32 for v in item.values())
    # deterministic
    again = train_ds[0]
    for k in item:
        assert torch.equal(item[k], again[k]), k
    model.eval()
    with torch.no_grad():
        out = model(**{k: v[None] for k, v in fwd.items()})
    assert out["segmentation"].shape == (1, 1, z, x)


def _expected_footprint(cfg, ref_T_ego, center, size, yaw):
    """Cells whose centre falls in the box footprint, computed in the ego frame by hand."""
    z_n, _, x_n = cfg.grid
    xmin, _, _, _, zmin, _ = cfg.bounds
    dx, _, dz = cfg.voxel_size
    ego_T_ref = np.linalg.inv(ref_T_ego)
    mask = np.zeros((z_n, x_n), dtype=bool)
    w, l, _ = size
    c, s = math.cos(yaw), math.sin(yaw)
    for iz in range(z_n):
        for ix in range(x_n):
            # the grid cell centre at the box's height (height does not matter for a footprint)
            p_ref = np.array([xmin + (ix + 0.5) * dx, 0.0, zmin + (iz + 0.5) * dz, 1.0])
            p_ego = ego_T_ref @ p_ref
            ddx, ddy = p_ego[0] - center[0], p_ego[1] - center[1]
            along, across = c * ddx + s * ddy, -s * ddx + c * ddy
            mask[iz, ix] = abs(along) < l / 2 and abs(across) < w / 2
    return mask


def test_vehicle_boxes_land_in_right_cells(tiny_nusc, train_ds):
    ref_T_ego = _ref_T_ego(tiny_nusc)
    for i in range(len(train_ds)):
        token = train_ds.sample_tokens[i]
        s_info = next(s for s in tiny_nusc["samples"] if s["token"] == token)
        item = train_ds[i]
        expected = np.zeros(CFG.grid[::2], dtype=bool)
        hidden = np.zeros_like(expected)
        for v in s_info["vehicles"]:
            fp = _expected_footprint(CFG, ref_T_ego, v["center_ego"], v["size"], v["yaw_ego"])
            assert fp.sum() >= 4  # each known vehicle covers several cells
            expected |= fp
            if v["visibility"] == "1":
                hidden |= fp
        gt = item["vehicle_gt"][0].numpy() > 0
        np.testing.assert_array_equal(gt, expected)
        np.testing.assert_array_equal(item["valid_mask"][0].numpy() == 0, hidden)
        # the pedestrian is not a vehicle
        ped = s_info["others"][0]
        ped_fp = _expected_footprint(CFG, ref_T_ego, ped["center_ego"], (1.5, 1.5, 1.8), 0.0)
        assert not gt[ped_fp & ~expected].any()


def test_radar_points_land_in_right_cell_and_channel(tiny_nusc, train_ds):
    ref_T_ego = _ref_T_ego(tiny_nusc)
    y_n = CFG.grid[1]
    for i in range(len(train_ds)):
        s_info = next(s for s in tiny_nusc["samples"] if s["token"] == train_ds.sample_tokens[i])
        radar = train_ds[i]["radar_bev"]
        assert len(s_info["radar_points"]) == 2
        for pt in s_info["radar_points"]:
            p_ref = ref_T_ego @ np.array([*pt["ego_xyz"], 1.0])
            iz, iy, ix = _cell(CFG, p_ref)
            got = radar[[f * y_n + iy for f in range(16)], iz, ix].numpy()
            want = np.array(pt["fields"] + [0.0], dtype=np.float32)  # keyframe: time lag 0
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            # other Y bins of that column are empty
            others = [f * y_n + yy for f in range(16) for yy in range(y_n) if yy != iy]
            assert torch.all(radar[others, iz, ix] == 0)
        # older sweeps are in the tensor too, with positive time lags
        lags = radar[15 * y_n:16 * y_n]
        assert (lags > 0).any()


def test_radar_occupancy_mode(tiny_nusc, train_ds):
    cfg = SimpleBEVConfig.tiny(modalities=("camera", "radar"), radar_mode="occupancy",
                               grid=CFG.grid, bounds=CFG.bounds)
    ds = NuScenesBEVDataset(tiny_nusc["dataroot"], "v1.0-mini", "mini_train", cfg, nusc=train_ds.nusc)
    item = ds[0]
    assert item["radar_bev"].shape == (1, 64, 64) and "lidar_bev" not in item
    assert set(item["radar_bev"].unique().tolist()) <= {0.0, 1.0}
    ref_T_ego = _ref_T_ego(tiny_nusc)
    s_info = next(s for s in tiny_nusc["samples"] if s["token"] == ds.sample_tokens[0])
    for pt in s_info["radar_points"]:
        iz, _, ix = _cell(cfg, ref_T_ego @ np.array([*pt["ego_xyz"], 1.0]))
        assert item["radar_bev"][0, iz, ix] == 1


def test_lidar_point_lands_in_right_cell(tiny_nusc, train_ds):
    ref_T_ego = _ref_T_ego(tiny_nusc)
    s_info = next(s for s in tiny_nusc["samples"] if s["token"] == train_ds.sample_tokens[0])
    lidar = train_ds[0]["lidar_bev"]
    (pt,) = s_info["lidar_points"]
    iz, iy, ix = _cell(CFG, ref_T_ego @ np.array([*pt["ego_xyz"], 1.0]))
    assert lidar[iy, iz, ix] == 1
    assert set(lidar.unique().tolist()) <= {0.0, 1.0}


def test_training_steps_reduce_loss(train_ds):
    torch.manual_seed(0)
    cfg = CFG
    model = SimpleBEV(cfg).train()
    batch = torch.utils.data.default_collate([train_ds[0], train_ds[1]])
    fwd = train_ds.forward_kwargs(batch)
    gt, valid = batch["vehicle_gt"], batch["valid_mask"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        logits = model(**fwd)["segmentation"]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, gt, reduction="none")
        loss = (bce * valid).sum() / valid.sum().clamp(min=1.0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


def test_error_missing_dataroot(tmp_path):
    with pytest.raises(LMDError, match="does not exist"):
        NuScenesBEVDataset(str(tmp_path / "nowhere"), "v1.0-mini", "mini_val", CFG)


def test_error_wrong_version(tiny_nusc):
    with pytest.raises(LMDError, match=r"v1\.0-trainval.*not found.*\['v1\.0-mini'\]"):
        NuScenesBEVDataset(tiny_nusc["dataroot"], "v1.0-trainval", "val", CFG)
    with pytest.raises(LMDError, match="unknown nuScenes version"):
        NuScenesBEVDataset(tiny_nusc["dataroot"], "v2.0", "val", CFG)
    with pytest.raises(LMDError, match="split 'val' does not belong"):
        NuScenesBEVDataset(tiny_nusc["dataroot"], "v1.0-mini", "val", CFG)


def test_error_missing_file(tmp_path):
    info = write_tiny_nuscenes(str(tmp_path), scenes=1, samples_per_scene=1, sweeps_per_sample=0,
                               image_size=(32, 18))
    ds = NuScenesBEVDataset(str(tmp_path), "v1.0-mini", "mini_train", CFG)
    sd = ds.nusc.get("sample_data", ds.samples[0]["data"]["CAM_BACK"])
    os.remove(os.path.join(str(tmp_path), sd["filename"]))
    with pytest.raises(LMDError, match=r"CAM_BACK.*missing"):
        ds[0]
    # a missing table is reported too
    os.remove(os.path.join(str(tmp_path), "v1.0-mini", "visibility.json"))
    with pytest.raises(LMDError, match="incomplete"):
        NuScenesBEVDataset(str(tmp_path), "v1.0-mini", "mini_train", CFG)
    assert info["scene_names"] == ["scene-0061"]


def test_camera_order_and_reference():
    assert CAMERAS == ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK",
                       "CAM_BACK_RIGHT")


def test_vehicle_iou_hand_computed():
    logits = torch.tensor([[[[2.0, -1.0, 0.5], [-3.0, 1.0, -0.1]]]])  # pred: 1 0 1 / 0 1 0
    gt = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]])
    # no mask: I = cells (0,0),(1,1) = 2; U = (0,0),(0,1),(0,2),(1,1) = 4
    assert vehicle_iou(logits, gt) == (2.0, 4.0, 0.5)
    valid = torch.tensor([[[[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]]])  # drop (0,1)
    assert vehicle_iou(logits, gt, valid) == (2.0, 3.0, 2.0 / 3.0)
    acc = VehicleIoU()
    acc.update(logits, gt, valid)
    acc.update(-torch.ones_like(logits), gt)  # I 0, U 3
    assert (acc.intersection, acc.union) == (2.0, 6.0)
    assert acc.compute() == pytest.approx(1.0 / 3.0)
    empty = VehicleIoU()
    assert empty.compute() == 1.0
    with pytest.raises(LMDError):
        vehicle_iou(logits, gt[..., :2])
