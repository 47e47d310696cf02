"""The synthetic sensor world, its ground-truth attribution score, the world weights and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmdfx
from lmdfx.bev import attribution
from lmdfx.bev.data import sensor_world as sw
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig
from lmdfx.bev.weights import WORLD_WEIGHTS, _uniform, deterministic_init, is_trained, load_world_model


@pytest.fixture(scope="module")
def world():
    return sw.SensorWorld(num_scenes=24, seed=5)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def test_items_are_simplebev_inputs_and_deterministic(world):
    cfg = world.config
    item = world[3]
    z, y, x = cfg.grid
    assert item["images"].shape == (6, 3, *cfg.image_size)
    assert item["radar_bev"].shape == (16 * y, z, x)
    assert item["lift_grid"].shape == (6, z, y, x, 2)
    assert item["vehicle_gt"].shape == item["valid_mask"].shape == (1, z, x)
    assert item["images"].min() >= -0.5 and item["images"].max() <= 0.5
    again = sw.SensorWorld(num_scenes=24, seed=5)[3]
    for key in item:
        assert torch.equal(item[key], again[key]), key
    other = sw.SensorWorld(num_scenes=24, seed=6)[3]
    assert not torch.equal(item["images"], other["images"])
    model = SimpleBEV(cfg).eval()
    with torch.no_grad():
        out = model(**{k: v[None] for k, v in sw.SensorWorld.forward_kwargs(item).items()})
    assert out["segmentation"].shape == (1, 1, z, x)


def test_visibility_is_known(world):
    kinds = set()
    for k in range(len(world)):
        scene = world.scene(k)
        radar = scene.inputs["radar_bev"].abs().sum(0).numpy() > 0
        gt = np.zeros_like(radar)
        unseen = np.zeros_like(radar)
        for obj in scene.objects:
            kinds.add(obj.visible_to)
            assert set(obj.seen_by) <= set(obj.visible_to)
            if "radar" not in obj.visible_to:
                assert obj.radar_points == 0
            else:
                assert obj.radar_points > 0 and "radar" in obj.seen_by
                assert (radar & _dilate(_dilate(obj.mask))).any()  # returns at the vehicle (motion blurs them)
            if "camera" not in obj.visible_to:
                assert obj.camera_pixels == 0
            assert obj.mask.any()
            gt |= obj.mask
            if not obj.seen_by:
                unseen |= obj.mask
        assert np.array_equal(scene.vehicle_gt[0].numpy() > 0, gt)
        assert np.array_equal(scene.valid_mask[0].numpy() == 0, unseen)
    assert kinds == {("camera",), ("radar",), ("camera", "radar")}


def test_camera_paints_only_camera_visible_vehicles():
    quiet = dict(num_scenes=1, seed=0, clutter=(0, 0), poles=(0, 0), vehicles=(4, 4))
    cam_only = sw.SensorWorld(p_camera_only=1.0, p_radar_only=0.0, **quiet)
    radar_only = sw.SensorWorld(p_camera_only=0.0, p_radar_only=1.0, **quiet)
    a, b = cam_only.scene(0), radar_only.scene(0)
    # same placement (same random stream), only the visibility differs
    assert [o.center for o in a.objects] == [o.center for o in b.objects]
    assert all(o.radar_points == 0 for o in a.objects) and a.inputs["radar_bev"].abs().sum() == 0
    assert all(o.camera_pixels == 0 for o in b.objects)
    assert any(o.camera_pixels > 0 for o in a.objects)
    assert all(o.radar_points > 0 for o in b.objects)
    # radar-only vehicles leave the images at background (sky above the horizon, road below)
    img = b.inputs["images"]
    assert float((img[:, :, 40:] - img[:, :, 40:].mean(dim=(-1, -2), keepdim=True)).abs().max()) < 0.2


def test_world_rejects_bad_configs():
    with pytest.raises(lmdfx.LMDError, match="camera and radar"):
        sw.SensorWorld(config=SimpleBEVConfig.tiny(modalities=("camera",)))
    with pytest.raises(lmdfx.LMDError, match="sum to at most 1"):
        sw.SensorWorld(p_camera_only=0.7, p_radar_only=0.7)
    with pytest.raises(IndexError):
        sw.SensorWorld(num_scenes=2).scene(2)


def test_attribution_score_on_oracle_maps(world):
    def oracle(inputs, swap=False, sign=1.0):
        # find the scene by its images, paint each single-sensor vehicle into its sensor's map
        scene = next(s for s in map(world.scene, range(len(world)))
                     if torch.equal(s.inputs["images"], inputs["images"]))
        maps = torch.zeros(2, *scene.vehicle_gt.shape[1:])
        for o in scene.objects:
            if o.single_sensor:
                idx = sw.SENSORS.index(o.single_sensor)
                maps[1 - idx if swap else idx][torch.from_numpy(o.mask)] = sign
        return maps

    subset = range(6)
    right = attribution.attribution_score(oracle, world, subset, names=sw.SENSORS)
    assert right.total > 0 and right.score == 1.0
    wrong = attribution.attribution_score(lambda i: oracle(i, swap=True), world, subset, names=sw.SENSORS)
    assert wrong.score == 0.0
    negative = attribution.attribution_score(lambda i: oracle(i, sign=-1.0), world, subset, names=sw.SENSORS)
    assert negative.score == 0.0 and all(r["dominant"] is None for r in negative.records)
    per = right.per_sensor()
    assert sum(t for _, t in per.values()) == right.total
    assert "camera-only" in right.table() or "radar-only" in right.table()
    with pytest.raises(lmdfx.LMDError, match="sensors"):
        attribution.attribution_score(oracle, world, subset, names=("a", "b"))


def test_deterministic_init_is_platform_independent():
    # integer-only generator: these bits are the same everywhere
    values = _uniform("decoder.layer3.0.conv1.weight", 0, 4)
    expected = _uniform("decoder.layer3.0.conv1.weight", 0, 6)[:4]
    assert np.array_equal(values, expected)
    assert np.all(np.abs(values) <= 1.0)
    assert [round(float(v), 12) for v in _uniform("x", 0, 2)] == [round(float(v), 12) for v in _uniform("x", 0, 2)]
    m1, m2 = SimpleBEV(sw.world_config()), SimpleBEV(sw.world_config())
    deterministic_init(m1, 0)
    deterministic_init(m2, 0)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    w = m1.state_dict()["decoder.layer3.0.conv1.weight"]
    assert float(w.abs().max()) <= (6.0 / (w.shape[0] * 9)) ** 0.5
    assert is_trained("decoder.segmentation_head.3.bias") and not is_trained("encoder.layer3.0.conv1.weight")
    assert not is_trained("decoder.bn1.running_var")


@pytest.mark.skipif(not WORLD_WEIGHTS.is_file(), reason="shipped world weights missing")
def test_shipped_weights_attribute_single_sensor_vehicles():
    assert WORLD_WEIGHTS.stat().st_size < 5_000_000
    model = load_world_model()
    dec = lmdfx.compile(model, model.modality_args)
    unseen = sw.SensorWorld(num_scenes=10, seed=3, config=model.config)
    score = attribution.attribution_score(attribution.lmd_maps(dec), unseen)
    assert score.total >= 20
    # measured with the shipped weights: camera 7/11, radar 11/14 (0.72); chance is 0.5 at best
    assert score.score >= 0.65, score.table()
    for sensor, (hits, total) in score.per_sensor().items():
        assert hits / total >= 0.55, (sensor, hits, total)
    # the exact Shapley baseline (zero inputs) names the right sensor for every one of them
    assert attribution.attribution_score(attribution.shapley_maps(dec), unseen).score >= 0.9


def test_training_script_writes_loadable_weights(tmp_path):
    from lmdfx.bev.train_world import train

    path = tmp_path / "w.pt"
    trained = train(str(path), scenes=4, val_scenes=2, steps=2, batch=2, progress=False, log=lambda *_: None)
    loaded = load_world_model(path)
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.world_meta["steps"] == 2 and not loaded.training
    blob = torch.load(path, weights_only=True)
    assert sorted(blob["trained"]) == sorted(k for k in loaded.state_dict() if is_trained(k))
    with pytest.raises(lmdfx.LMDError, match="not found"):
        load_world_model(tmp_path / "missing.pt")
