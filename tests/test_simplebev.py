"""SimpleBEV: official state-dict layout, fx traceability, checkpoints, lifting."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch
import torch.fx

from lmdfx.errors import LMDError
from lmdfx.bev.models.simplebev import (
    SimpleBEV,
    SimpleBEVConfig,
    latest_checkpoint,
    lifting_grids,
    load_checkpoint,
    ring_rig,
)

ALL_MODS = ("camera", "radar", "lidar")


@pytest.fixture(scope="module")
def released_radar_sd() -> dict[str, torch.Tensor]:
    return SimpleBEV(SimpleBEVConfig.released_radar()).state_dict()


# The official key/shape list of the released camera+radar checkpoint,
# written out by hand so the test does not derive it from the model under test.
OFFICIAL_SHAPES = {
    "encoder.backbone.0.weight": (64, 3, 7, 7),
    "encoder.backbone.1.weight": (64,),
    "encoder.backbone.1.running_var": (64,),
    "encoder.backbone.1.num_batches_tracked": (),
    "encoder.backbone.4.0.conv1.weight": (64, 64, 1, 1),
    "encoder.backbone.4.0.conv3.weight": (256, 64, 1, 1),
    "encoder.backbone.4.0.downsample.0.weight": (256, 64, 1, 1),
    "encoder.backbone.4.0.downsample.1.running_mean": (256,),
    "encoder.backbone.4.2.bn3.bias": (256,),
    "encoder.backbone.5.0.conv2.weight": (128, 128, 3, 3),
    "encoder.backbone.5.0.downsample.0.weight": (512, 256, 1, 1),
    "encoder.backbone.5.3.conv3.weight": (512, 128, 1, 1),
    "encoder.layer3.0.conv1.weight": (256, 512, 1, 1),
    "encoder.layer3.0.downsample.0.weight": (1024, 512, 1, 1),
    "encoder.layer3.22.conv3.weight": (1024, 256, 1, 1),
    "encoder.layer3.22.bn3.running_mean": (1024,),
    "encoder.upsampling_layer.conv.0.weight": (512, 1536, 3, 3),
    "encoder.upsampling_layer.conv.3.weight": (512, 512, 3, 3),
    "encoder.depth_layer.weight": (128, 512, 1, 1),
    "encoder.depth_layer.bias": (128,),
    "bev_compressor.0.weight": (128, 1152, 3, 3),
    "decoder.first_conv.weight": (64, 128, 7, 7),
    "decoder.bn1.weight": (64,),
    "decoder.bn1.running_mean": (64,),
    "decoder.layer1.0.conv1.weight": (64, 64, 3, 3),
    "decoder.layer1.1.bn2.weight": (64,),
    "decoder.layer2.0.conv1.weight": (128, 64, 3, 3),
    "decoder.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "decoder.layer2.0.downsample.1.weight": (128,),
    "decoder.layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "decoder.layer3.1.conv2.weight": (256, 256, 3, 3),
    "decoder.up3_skip.upsample_layer.1.weight": (128, 256, 1, 1),
    "decoder.up2_skip.upsample_layer.1.weight": (64, 128, 1, 1),
    "decoder.up1_skip.upsample_layer.1.weight": (128, 64, 1, 1),
    "decoder.feat_head.0.weight": (128, 128, 3, 3),
    "decoder.feat_head.3.weight": (128, 128, 1, 1),
    "decoder.feat_head.3.bias": (128,),
    "decoder.segmentation_head.0.weight": (128, 128, 3, 3),
    "decoder.segmentation_head.3.weight": (1, 128, 1, 1),
    "decoder.segmentation_head.3.bias": (1,),
    "decoder.instance_offset_head.3.weight": (2, 128, 1, 1),
    "decoder.instance_offset_head.3.bias": (2,),
    "decoder.instance_center_head.0.weight": (128, 128, 3, 3),
    "decoder.instance_center_head.3.weight": (1, 128, 1, 1),
    "decoder.instance_center_head.3.bias": (1,),
    "ce_weight": (),
    "center_weight": (),
    "offset_weight": (),
}


def test_released_radar_official_keys_and_shapes(released_radar_sd):
    sd = released_radar_sd
    for key, shape in OFFICIAL_SHAPES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape), shape)


def test_released_radar_key_counts(released_radar_sd):
    sd = released_radar_sd

    def blocks(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    # ResNet-101: layer1 3 blocks, layer2 4, layer3 23; decoder ResNet-18 layers 2 blocks each
    assert blocks("encoder.backbone.4.") == 3
    assert blocks("encoder.backbone.5.") == 4
    assert blocks("encoder.layer3.") == 23
    for i in (1, 2, 3):
        assert blocks(f"decoder.layer{i}.") == 2
    # bottleneck: 3 convs + 3 BNs (5 entries each) = 18; +1 conv +1 BN for the first block
    per = Counter(".".join(k.split(".")[:3]) for k in sd if k.startswith("encoder.layer3."))
    assert per["encoder.layer3.0"] == 24 and per["encoder.layer3.1"] == 18
    top = Counter(k.split(".")[0] for k in sd)
    assert set(top) == {"encoder", "bev_compressor", "decoder", "ce_weight", "center_weight", "offset_weight"}
    assert top["bev_compressor"] == 1  # InstanceNorm has no state
    # only the backbone indices that hold parameters appear
    assert {k.split(".")[2] for k in sd if k.startswith("encoder.backbone.")} == {"0", "1", "4", "5"}
    assert {k for k in sd if k.startswith("encoder.upsampling_layer.")} == {
        "encoder.upsampling_layer.conv.0.weight",
        "encoder.upsampling_layer.conv.3.weight",
    }
    # normalisation constants are buffers but not part of the checkpoint
    assert "mean" not in sd and "std" not in sd


def test_camera_preset_and_other_presets():
    cam = SimpleBEVConfig.released_camera()
    assert cam.modalities == ("camera",) and cam.image_size == (448, 800) and cam.grid == (200, 8, 200)
    paper = SimpleBEVConfig.lmd_paper()
    assert paper.image_size == (224, 400) and paper.modalities == ("camera", "radar")
    assert SimpleBEVConfig.lmd_paper(modalities=("camera", "lidar")).lidar_channels == 8
    occ = SimpleBEVConfig(modalities=("camera", "radar"), radar_mode="occupancy")
    assert occ.radar_channels == 1
    assert SimpleBEVConfig.released_radar().radar_channels == 128


@pytest.mark.parametrize(
    "mods", [("camera",), ("camera", "radar"), ("camera", "lidar"), ALL_MODS, ("radar", "camera")]
)
def test_tiny_forward_shapes_and_fx_trace(mods):
    cfg = SimpleBEVConfig.tiny(modalities=mods)
    model = SimpleBEV(cfg).eval()
    inputs = model.example_inputs(batch_size=2, generator=torch.Generator().manual_seed(0))
    assert set(inputs) == {"images", "lift_grid", "lift_valid", *model.modality_args.values()}
    assert list(model.modality_args) == list(mods)
    params = list(inspect.signature(model.forward).parameters)
    assert all(name in params for name in inputs)
    with torch.no_grad():
        out = model(**inputs)
        gm = torch.fx.symbolic_trace(model)
        out_fx = gm(**inputs)
    z, _, x = cfg.grid
    assert out["segmentation"].shape == (2, 1, z, x)
    assert out["instance_center"].shape == (2, 1, z, x)
    assert out["instance_offset"].shape == (2, 2, z, x)
    assert out["feat"].shape == (2, cfg.latent_dim, z, x)
    assert torch.all((out["instance_center"] >= 0) & (out["instance_center"] <= 1))
    for k in out:
        torch.testing.assert_close(out_fx[k], out[k], rtol=0, atol=0)


def test_fx_graph_is_out_of_place_and_modalities_enter_at_fusion():
    model = SimpleBEV(SimpleBEVConfig.tiny(modalities=ALL_MODS))
    gm = torch.fx.symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in ("radar_bev", "lidar_bev"):
        users = list(nodes[name].users)
        assert len(users) == 1 and users[0].target is torch.cat, (name, users)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            assert not getattr(mod, "inplace", False), n.target
        if n.op in ("call_function", "call_method"):
            tname = getattr(n.target, "__name__", str(n.target))
            assert not (tname.endswith("_") and not tname.startswith("_")), tname
            assert tname not in ("setitem", "iadd"), tname


def test_missing_modality_input_raises():
    model = SimpleBEV(SimpleBEVConfig.tiny(modalities=("camera", "radar")))
    inputs = model.example_inputs()
    inputs.pop("radar_bev")
    with pytest.raises(LMDError, match="radar_bev"):
        model(**inputs)


def test_bad_configs_raise():
    with pytest.raises(LMDError, match="encoder"):
        SimpleBEVConfig(encoder="vgg16")
    with pytest.raises(LMDError, match="modalities"):
        SimpleBEVConfig(modalities=("camera", "sonar"))
    with pytest.raises(LMDError, match="camera"):
        SimpleBEVConfig(modalities=("radar",))
    with pytest.raises(LMDError, match="divisible by 16"):
        SimpleBEVConfig(image_size=(450, 800))
    with pytest.raises(LMDError, match="radar_mode"):
        SimpleBEVConfig(radar_mode="points")


def test_lifting_geometry_matches_hand_projection():
    cfg = SimpleBEVConfig.tiny()
    intr, c2r = ring_rig(cfg)
    grid, valid = lifting_grids(cfg, intr, c2r)
    z_n, y_n, x_n = cfg.grid
    assert grid.shape == (6, z_n, y_n, x_n, 2) and valid.shape == (6, z_n, y_n, x_n)
    # voxel (z, y, x) centre by hand, projected into camera 0 (the reference camera itself)
    xmin, _, ymin, _, zmin, _ = cfg.bounds
    dx, dy, dz = cfg.voxel_size
    hf, wf = cfg.feature_size
    iz, iy, ix = z_n - 3, 2, x_n // 2 + 1
    p = torch.tensor([xmin + (ix + 0.5) * dx, ymin + (iy + 0.5) * dy, zmin + (iz + 0.5) * dz], dtype=torch.float64)
    k = intr[0].clone()
    u = k[0, 0] * p[0] / p[2] + k[0, 2]
    v = k[1, 1] * p[1] / p[2] + k[1, 2]
    u, v = u * wf / cfg.image_size[1], v * hf / cfg.image_size[0]
    assert valid[0, iz, iy, ix] == 1
    torch.testing.assert_close(grid[0, iz, iy, ix].double(), torch.stack([2 * u / (wf - 1) - 1, 2 * v / (hf - 1) - 1]),
                               atol=1e-5, rtol=0)
    # behind the reference camera: invalid for camera 0, seen by the rear camera
    assert valid[0, 2, iy, ix] == 0 and valid[3, 2, iy, ix] == 1
    # union of the ring covers most of the grid
    assert valid.amax(0).mean() > 0.8


def test_camera_average_over_seeing_cameras():
    """A voxel seen by two cameras gets the mean of the two samples, one seen by none gets 0."""
    cfg = SimpleBEVConfig.tiny(modalities=("camera",))
    model = SimpleBEV(cfg).eval()
    inputs = model.example_inputs()
    feats = {}

    def hook(_m, _i, o):
        feats["bev"] = _i[0]

    h = model.bev_compressor.register_forward_hook(hook)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    bev = feats["bev"]  # [1, C*Y, Z, X]
    valid = inputs["lift_valid"][0]
    z_n, y_n, x_n = cfg.grid
    cnt = valid.sum(0)
    unseen = (cnt == 0).nonzero()
    assert len(unseen) > 0
    zz, yy, xx = unseen[0].tolist()
    assert torch.all(bev[0, yy::y_n, zz, xx] == 0)  # channel c*Y + y


def _save(sd, path):
    torch.save({"model_state_dict": sd, "optimizer_state_dict": {}}, path)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    cfg = SimpleBEVConfig.tiny()
    src = SimpleBEV(cfg)
    with torch.no_grad():
        src.ce_weight.fill_(0.25)
    path = tmp_path / "model-000025000.pth"
    _save(src.state_dict(), path)
    dst = SimpleBEV(cfg)
    ckpt = load_checkpoint(dst, path)
    assert "model_state_dict" in ckpt
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    # DataParallel-style "module." prefixes load too
    _save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "dp.pth")
    load_checkpoint(SimpleBEV(cfg), tmp_path / "dp.pth")

    sd = src.state_dict()
    missing = dict(sd)
    del missing["decoder.segmentation_head.3.bias"]
    _save(missing, tmp_path / "missing.pth")
    with pytest.raises(LMDError, match=r"Missing keys 1: \[decoder\.segmentation_head\.3\.bias\]") as e:
        load_checkpoint(SimpleBEV(cfg), tmp_path / "missing.pth")
    assert "released_radar" in str(e.value)

    wrong = dict(sd)
    wrong["bev_compressor.0.weight"] = torch.zeros(16, 3, 3, 3)
    _save(wrong, tmp_path / "shape.pth")
    with pytest.raises(LMDError, match=r"bev_compressor\.0\.weight \(checkpoint \(16, 3, 3, 3\)"):
        load_checkpoint(SimpleBEV(cfg), tmp_path / "shape.pth")

    extra = dict(sd)
    extra["decoder.instance_future_head.0.weight"] = torch.zeros(1)
    _save(extra, tmp_path / "extra.pth")
    with pytest.raises(LMDError, match=r"unexpected keys 1: \[decoder\.instance_future_head\.0\.weight\]"):
        load_checkpoint(SimpleBEV(cfg), tmp_path / "extra.pth")

    # a camera+radar checkpoint into a camera-only model: clear shape mismatch on the fusion conv
    with pytest.raises(LMDError, match="bev_compressor"):
        load_checkpoint(SimpleBEV(SimpleBEVConfig.tiny(modalities=("camera",))), path)

    with pytest.raises(LMDError, match="does not exist"):
        load_checkpoint(SimpleBEV(cfg), tmp_path / "nope.pth")
    torch.save({"state_dict": sd}, tmp_path / "nokey.pth")
    with pytest.raises(LMDError, match="model_state_dict"):
        load_checkpoint(SimpleBEV(cfg), tmp_path / "nokey.pth")


@pytest.mark.parametrize("content, problem", [
    (lambda good: good[: len(good) // 2], r"is truncated: a torch\.save zip archive whose end is missing"),
    (lambda good: b"not a checkpoint\n", r"is damaged or not written by torch\.save"),
    (lambda good: b"", r"is empty"),
])
def test_unreadable_checkpoint_is_named(tmp_path, content, problem):
    good = tmp_path / "good.pth"
    _save(SimpleBEV(SimpleBEVConfig.tiny()).state_dict(), good)
    bad = tmp_path / "model-000001.pth"
    bad.write_bytes(content(good.read_bytes()))
    with pytest.raises(LMDError, match=f"checkpoint '{bad}' {problem}"):
        load_checkpoint(SimpleBEV(SimpleBEVConfig.tiny()), bad)


@pytest.mark.parametrize("state, problem", [
    ([1, 2], r"its 'model_state_dict' is a list, not a dict"),
    ({"bev_compressor.0.weight": "weights"}, r"its 'model_state_dict' maps 'bev_compressor\.0\.weight' to a str"),
])
def test_malformed_state_dict_is_named(tmp_path, state, problem):
    path = tmp_path / "odd.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(LMDError, match=f"checkpoint '{path}': {problem}"):
        load_checkpoint(SimpleBEV(SimpleBEVConfig.tiny()), path)


def test_latest_checkpoint_compares_steps_as_numbers(tmp_path):
    for name in ("model-9.pth", "model-000008.pth", "model-10.pth", "model-final.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model-10.pth")
    (tmp_path / "model-000025000.pth").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model-000025000.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LMDError, match=r"holds no model-\*\.pth file"):
        latest_checkpoint(empty)
    with pytest.raises(LMDError, match="is not a folder"):
        latest_checkpoint(tmp_path / "notes.txt")


def test_normalisation_buffers_not_persistent():
    model = SimpleBEV(SimpleBEVConfig.tiny())
    bufs = dict(model.named_buffers())
    torch.testing.assert_close(bufs["mean"].flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(bufs["std"].flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert "mean" not in model.state_dict()
