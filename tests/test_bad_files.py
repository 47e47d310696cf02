"""Damaged nuScenes files and world weights raise an LMDError that names the file and says what is wrong."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from lmdfx.bev.data.nuscenes import NuScenesBEVDataset
from lmdfx.bev.models.simplebev import SimpleBEVConfig
from lmdfx.bev.weights import WORLD_WEIGHTS, load_world_model
from lmdfx.errors import LMDError

CFG = SimpleBEVConfig.tiny(
    modalities=("camera", "radar", "lidar"), grid=(8, 2, 8), bounds=(-32.0, 32.0, -4.0, 6.0, -32.0, 32.0)
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    pytest.importorskip("nuscenes")  # the world-weights cases below run without the devkit
    from lmdfx.bev.data.nuscenes_synthetic import write_tiny_nuscenes

    root = tmp_path_factory.mktemp("pristine")
    write_tiny_nuscenes(str(root), scenes=1, samples_per_scene=1, sweeps_per_sample=0, image_size=(32, 18))
    return root


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _radar_body(keep: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        start = data.index(b"DATA binary\n") + len(b"DATA binary\n")
        return data[: start + keep]

    return edit


def _resized(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).resize((64, 36)).save(out, format="JPEG")
    return out.getvalue()


def _principal_point_off_image(data: bytes) -> bytes:
    rows = json.loads(data)
    for row in rows:
        if row["camera_intrinsic"]:
            row["camera_intrinsic"][0][2] = 816.3  # the 1600x900 principal point on a 32x18 image
    return json.dumps(rows).encode()


# (file glob under dataroot, edit of its bytes, what the message must say)
TABLE_CASES = {
    "table cut in half": ("v1.0-mini/sample.json", _half, r"is not valid JSON .*truncated"),
    "table not JSON": ("v1.0-mini/sample.json", lambda d: b"<html>404</html>", r"is not valid JSON"),
    "table binary": ("v1.0-mini/sample_data.json", lambda d: b"\x89PNG\r\n\x1a\n\xff", r"is not UTF-8"),
    "table empty": ("v1.0-mini/ego_pose.json", lambda d: b"", r"is empty"),
    "table an object": ("v1.0-mini/scene.json", lambda d: b'{"scenes": []}',
                        r"holds a JSON object where a nuScenes table holds a list of records"),
    "table without tokens": ("v1.0-mini/log.json", lambda d: b'[{"name": 1}]', r"has a record without a 'token'"),
}
ITEM_CASES = {
    "radar body truncated": ("samples/RADAR_FRONT/*.pcd", _radar_body(50), r"holds 50 bytes of points .*truncated"),
    "radar last byte missing": ("samples/RADAR_FRONT/*.pcd", lambda d: d[:-1],
                                r"holds (\d+) bytes of points where WIDTH \d+ records of 43 bytes need \1 and one"),
    "radar header cut": ("samples/RADAR_FRONT/*.pcd", lambda d: d[:100], r"ends inside the header"),
    "radar wrong header": ("samples/RADAR_BACK_LEFT/*.pcd", lambda d: d.replace(b"VERSION", b"VERSON"),
                           r"has 'VERSON 0\.7' as header line 2 where a nuScenes radar PCD has VERSION"),
    "radar wrong layout": ("samples/RADAR_FRONT/*.pcd", lambda d: d.replace(b"SIZE 4 4 4 1 2", b"SIZE 4 4 4 4 2"),
                           r"declares SIZE '4 4 4 4 2"),
    "radar empty": ("samples/RADAR_FRONT_LEFT/*.pcd", lambda d: b"", r"is empty"),
    # 4002 bytes: np.fromfile drops the partial float and the devkit would silently read 200 points
    "lidar partial float": ("samples/LIDAR_TOP/*.pcd.bin", lambda d: d[:-18], r"has 4002 bytes, not a multiple of 20"),
    "lidar partial point": ("samples/LIDAR_TOP/*.pcd.bin", lambda d: d[:-8], r"has \d+ bytes, not a multiple of 20"),
    "lidar empty": ("samples/LIDAR_TOP/*.pcd.bin", lambda d: b"", r"is empty"),
    "jpeg truncated": ("samples/CAM_BACK/*.jpg", _half, r"could not be decoded .*truncated"),
    "jpeg not an image": ("samples/CAM_FRONT/*.jpg", lambda d: b"GIF? no", r"is not an image"),
    "jpeg resized": ("samples/CAM_BACK_LEFT/*.jpg", _resized, r"is 64x36 pixels but its sample_data record says 32x18"),
}


def _damage(pristine: Path, tmp_path: Path, pattern: str, edit: Callable[[bytes], bytes]) -> tuple[Path, Path]:
    """A copy of the dataset with one file edited; returns (dataroot, the damaged file)."""
    root = tmp_path / "nuscenes"
    shutil.copytree(pristine, root)
    (path,) = root.glob(pattern)
    path.write_bytes(edit(path.read_bytes()))
    return root, path


@pytest.mark.parametrize("case", TABLE_CASES)
def test_damaged_table_is_named(pristine, tmp_path, case):
    pattern, edit, problem = TABLE_CASES[case]
    root, path = _damage(pristine, tmp_path, pattern, edit)
    with pytest.raises(LMDError, match=re.escape(repr(str(path))) + " " + problem):
        NuScenesBEVDataset(root, "v1.0-mini", "mini_train", CFG)


@pytest.mark.parametrize("case", ITEM_CASES)
def test_damaged_sensor_file_is_named(pristine, tmp_path, case):
    pattern, edit, problem = ITEM_CASES[case]
    root, path = _damage(pristine, tmp_path, pattern, edit)
    ds = NuScenesBEVDataset(root, "v1.0-mini", "mini_train", CFG)
    with pytest.raises(LMDError, match=re.escape(repr(str(path))) + " " + problem):
        ds[0]


def test_principal_point_outside_the_image(pristine, tmp_path):
    root, _ = _damage(pristine, tmp_path, "v1.0-mini/calibrated_sensor.json", _principal_point_off_image)
    ds = NuScenesBEVDataset(root, "v1.0-mini", "mini_train", CFG)
    with pytest.raises(LMDError, match=r"principal point \(816\.3, .*\) of the CAM_FRONT_LEFT intrinsics lies "
                                       r"outside the 32x18 image '.*CAM_FRONT_LEFT.*\.jpg'"):
        ds[0]


def test_pristine_copy_loads(pristine, tmp_path):
    root, _ = _damage(pristine, tmp_path, "v1.0-mini/sample.json", lambda d: d)
    item = NuScenesBEVDataset(root, "v1.0-mini", "mini_train", CFG)[0]
    assert item["lidar_bev"].sum() > 0 and item["radar_bev"].abs().sum() > 0


# ---------------------------------------------------------------------------
# World weights
# ---------------------------------------------------------------------------
def _shipped_blob() -> dict:
    return torch.load(WORLD_WEIGHTS, map_location="cpu", weights_only=True)


def _edited(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        blob = _shipped_blob()
        edit(blob)
        torch.save(blob, path)

    return write


WEIGHT_CASES = {
    "truncated": (lambda p: p.write_bytes(_half(WORLD_WEIGHTS.read_bytes())), r"is truncated"),
    "not a torch file": (lambda p: p.write_bytes(b"hello world\n" * 10), r"is damaged or not written by torch\.save"),
    "empty": (lambda p: p.write_bytes(b""), r"is empty"),
    "refused objects": (lambda p: torch.save({"stat": os.stat_result((0,) * 10)}, p),
                        r"holds objects other than tensors"),
    "no trained tensors": (_edited(lambda b: b.pop("trained")), r"is malformed \('trained' is missing"),
    "seed of the wrong type": (_edited(lambda b: b.update(init_seed="0")), r"is malformed \('init_seed' is str"),
    "foreign config": (_edited(lambda b: b.update(config={"wheels": 4})),
                       r"holds a config that is not a SimpleBEVConfig"),
}


@pytest.mark.skipif(not WORLD_WEIGHTS.is_file(), reason="shipped world weights missing")
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_malformed_world_weights_are_named(tmp_path, case):
    write, problem = WEIGHT_CASES[case]
    path = tmp_path / "world.pt"
    write(path)
    with pytest.raises(LMDError, match=re.escape(repr(str(path))) + " " + problem + ".*train_world --out"):
        load_world_model(path)


@pytest.mark.skipif(not WORLD_WEIGHTS.is_file(), reason="shipped world weights missing")
def test_world_weights_of_the_wrong_shape(tmp_path):
    path = tmp_path / "world.pt"
    _edited(lambda b: b["trained"].update({"decoder.segmentation_head.3.bias": torch.zeros(3)}))(path)
    with pytest.raises(LMDError, match=r"holds 1 entries that are not tensors of the model's shapes: "
                                       r"decoder\.segmentation_head\.3\.bias \(Tensor \(3,\), model \(1,\)\)"):
        load_world_model(path)
