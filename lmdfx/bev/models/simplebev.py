"""SimpleBEV (Harley et al., ICRA 2023) rewritten to be torch.fx traceable.

The parameter layout and state-dict key names follow the released code
(``nets/segnet.py`` of aharley/simple_bev) so the released checkpoints load with
``strict=True``. What differs from the original is only *how* the forward is
written: static sizes come from :class:`SimpleBEVConfig`, calibration is turned
into sampling grids and validity masks by :func:`lifting_grids` before the model
runs, radar / LiDAR arrive already rasterised as BEV tensors, and every op is
out-of-place, so ``torch.fx.symbolic_trace(model)`` works.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmdfx.errors import LMDError

__all__ = [
    "SimpleBEVConfig",
    "SimpleBEV",
    "lifting_grids",
    "voxel_centers",
    "ring_rig",
    "load_checkpoint",
    "latest_checkpoint",
    "read_torch_file",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FEATURE_STRIDE",
    "METARADAR_FEATURES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Output stride of the camera encoder (layer2 resolution).
FEATURE_STRIDE = 8
#: Radar features per point: the 15 devkit fields after x, y, z plus the sweep time lag.
METARADAR_FEATURES = 16

_ENCODERS = {
    # name: (block kind, blocks per layer1..layer3)
    "resnet101": ("bottleneck", (3, 4, 23)),
    "resnet50": ("bottleneck", (3, 4, 6)),
    "resnet18": ("basic", (2, 2, 2)),
}
_MODALITIES = ("camera", "radar", "lidar")
_MODALITY_ARG = {"camera": "images", "radar": "radar_bev", "lidar": "lidar_bev"}


@dataclass(frozen=True)
class SimpleBEVConfig:
    """Static sizes and options of a SimpleBEV model.

    The reference frame is the cam0-like frame of SimpleBEV: x right, y down,
    z forward. The voxel grid is Z x Y x X (index order z, y, x) spanning
    ``bounds = (xmin, xmax, ymin, ymax, zmin, zmax)`` in metres.
    """

    image_size: tuple[int, int] = (448, 800)  # (H, W)
    num_cameras: int = 6
    grid: tuple[int, int, int] = (200, 8, 200)  # (Z, Y, X)
    bounds: tuple[float, float, float, float, float, float] = (-50.0, 50.0, -4.0, 6.0, -50.0, 50.0)
    latent_dim: int = 128
    encoder: str = "resnet101"
    modalities: tuple[str, ...] = ("camera", "radar")
    radar_mode: str = "metaradar"  # "metaradar" (16*Y channels) or "occupancy" (1 channel)
    radar_sweeps: int = 5
    radar_min_distance: float = 2.2
    radar_filters: bool = False  # SimpleBEV keeps all radar returns (devkit filters disabled)
    lidar_sweeps: int = 1

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or any(int(s) <= 0 for s in self.image_size):
            raise LMDError(f"image_size must be (H, W) with positive ints, got {self.image_size!r}.")
        h, w = self.image_size
        if h % 16 or w % 16:
            raise LMDError(
                f"image_size {self.image_size} must be divisible by 16 (stride-8 features are "
                "up-sampled from stride 16); resize the images to e.g. 448x800 or 224x400."
            )
        if len(self.grid) != 3 or any(int(g) <= 0 for g in self.grid):
            raise LMDError(f"grid must be (Z, Y, X) with positive ints, got {self.grid!r}.")
        z, _, x = self.grid
        if z % 8 or x % 8:
            raise LMDError(
                f"grid Z and X must be divisible by 8 (the BEV decoder down-samples 8x), got {self.grid}."
            )
        if len(self.bounds) != 6:
            raise LMDError("bounds must be (xmin, xmax, ymin, ymax, zmin, zmax).")
        b = self.bounds
        if not (b[0] < b[1] and b[2] < b[3] and b[4] < b[5]):
            raise LMDError(f"bounds must satisfy min < max on each axis, got {self.bounds}.")
        if self.encoder not in _ENCODERS:
            raise LMDError(f"encoder {self.encoder!r} is not one of {sorted(_ENCODERS)}.")
        if self.radar_mode not in ("metaradar", "occupancy"):
            raise LMDError(f"radar_mode {self.radar_mode!r} must be 'metaradar' or 'occupancy'.")
        mods = tuple(self.modalities)
        bad = [m for m in mods if m not in _MODALITIES]
        if bad or len(set(mods)) != len(mods):
            raise LMDError(
                f"modalities {mods!r} must be distinct names drawn from {_MODALITIES}."
            )
        if "camera" not in mods:
            raise LMDError(
                "SimpleBEV is camera-centric: modalities must include 'camera' "
                f"(got {mods!r}); add it, e.g. ('camera', 'radar')."
            )
        if self.num_cameras < 1 or self.latent_dim < 1:
            raise LMDError("num_cameras and latent_dim must be positive.")

    # ---- derived sizes -------------------------------------------------
    @property
    def feature_size(self) -> tuple[int, int]:
        """(Hf, Wf) of the camera feature maps (stride 8)."""
        return self.image_size[0] // FEATURE_STRIDE, self.image_size[1] // FEATURE_STRIDE

    @property
    def radar_channels(self) -> int:
        """Channels of ``radar_bev`` (0 when radar is not a modality)."""
        if "radar" not in self.modalities:
            return 0
        return METARADAR_FEATURES * self.grid[1] if self.radar_mode == "metaradar" else 1

    @property
    def lidar_channels(self) -> int:
        """Channels of ``lidar_bev``: one occupancy channel per Y bin (0 without LiDAR)."""
        return self.grid[1] if "lidar" in self.modalities else 0

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """(dx, dy, dz) in metres."""
        z, y, x = self.grid
        b = self.bounds
        return (b[1] - b[0]) / x, (b[3] - b[2]) / y, (b[5] - b[4]) / z

    # ---- presets -------------------------------------------------------
    @classmethod
    def released_radar(cls) -> "SimpleBEVConfig":
        """The released camera+radar checkpoint: ResNet-101, 448x800, 200x8x200, metaradar."""
        return cls(modalities=("camera", "radar"))

    @classmethod
    def released_camera(cls) -> "SimpleBEVConfig":
        """The released camera-only checkpoint: ResNet-101, 448x800, 200x8x200."""
        return cls(modalities=("camera",))

    @classmethod
    def lmd_paper(cls, modalities: Sequence[str] = ("camera", "radar")) -> "SimpleBEVConfig":
        """The LMD paper's setting: 224x400 input, 200x8x200 grid, ResNet-101."""
        return cls(image_size=(224, 400), modalities=tuple(modalities))

    @classmethod
    def tiny(cls, modalities: Sequence[str] = ("camera", "radar"), **overrides) -> "SimpleBEVConfig":
        """A CPU-test size: 6 cameras of 32x64, 32x4x32 grid, ResNet-18 encoder, latent 16."""
        cfg = cls(
            image_size=(32, 64),
            grid=(32, 4, 32),
            latent_dim=16,
            encoder="resnet18",
            modalities=tuple(modalities),
        )
        return replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------
# Geometry (plain functions, run before the model)
# --------------------------------------------------------------------------
def voxel_centers(config: SimpleBEVConfig, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Voxel centres in the reference frame, shape [Z, Y, X, 3] (x, y, z order in the last dim)."""
    z_n, y_n, x_n = config.grid
    xmin, _, ymin, _, zmin, _ = config.bounds
    dx, dy, dz = config.voxel_size
    xs = xmin + (torch.arange(x_n, dtype=dtype) + 0.5) * dx
    ys = ymin + (torch.arange(y_n, dtype=dtype) + 0.5) * dy
    zs = zmin + (torch.arange(z_n, dtype=dtype) + 0.5) * dz
    zz, yy, xx = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def lifting_grids(
    config: SimpleBEVConfig, intrinsics: torch.Tensor, cam_to_ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grids and validity masks that lift camera features into the voxel grid.

    ``intrinsics``: [..., S, 3, 3] (or 4x4) pinhole matrices at the *image* size of the config.
    ``cam_to_ref``: [..., S, 4, 4] rigid transforms camera -> reference (cam0) frame.
    Returns ``(lift_grid [..., S, Z, Y, X, 2], lift_valid [..., S, Z, Y, X])`` in float32.
    The grid is normalised as 2x/(Wf-1)-1 although sampling uses align_corners=False:
    that mismatch is the original's and is kept so released checkpoints see the same features.
    A voxel is valid for a camera when it is in front of it (z > 0) and projects inside
    (-0.5, Wf-0.5) x (-0.5, Hf-0.5) of the stride-8 feature map.
    """
    intrinsics = torch.as_tensor(intrinsics, dtype=torch.float64)
    cam_to_ref = torch.as_tensor(cam_to_ref, dtype=torch.float64)
    if intrinsics.shape[-2:] not in ((3, 3), (4, 4)) or cam_to_ref.shape[-2:] != (4, 4):
        raise LMDError(
            f"lifting_grids wants intrinsics [...,S,3,3] and cam_to_ref [...,S,4,4], got "
            f"{tuple(intrinsics.shape)} and {tuple(cam_to_ref.shape)}."
        )
    if intrinsics.shape[:-2] != cam_to_ref.shape[:-2] or intrinsics.shape[-3] != config.num_cameras:
        raise LMDError(
            f"intrinsics {tuple(intrinsics.shape)} and cam_to_ref {tuple(cam_to_ref.shape)} must "
            f"share leading dims and hold config.num_cameras={config.num_cameras} cameras."
        )
    h, w = config.image_size
    hf, wf = config.feature_size
    k = intrinsics[..., :3, :3].clone()
    # scale the image intrinsics to the feature map (the original's Hf/H, Wf/W scaling)
    k[..., 0, :] = k[..., 0, :] * (wf / w)
    k[..., 1, :] = k[..., 1, :] * (hf / h)
    ref_to_cam = torch.linalg.inv(cam_to_ref)
    pts = voxel_centers(config).reshape(-1, 3)  # [N, 3]
    lead = ref_to_cam.shape[:-2]
    rot = ref_to_cam[..., :3, :3]
    trans = ref_to_cam[..., :3, 3]
    cam_pts = torch.einsum("...ij,nj->...ni", rot, pts) + trans.unsqueeze(-2)  # [..., S, N, 3]
    pix = torch.einsum("...ij,...nj->...ni", k, cam_pts)
    depth = cam_pts[..., 2]
    denom = pix[..., 2:3].clamp(min=1e-6)
    uv = pix[..., :2] / denom
    u, v = uv[..., 0], uv[..., 1]
    valid = (depth > 0) & (u > -0.5) & (u < wf - 0.5) & (v > -0.5) & (v < hf - 0.5)
    gx = 2.0 * u / (wf - 1) - 1.0 if wf > 1 else torch.zeros_like(u)
    gy = 2.0 * v / (hf - 1) - 1.0 if hf > 1 else torch.zeros_like(v)
    grid = torch.stack([gx, gy], dim=-1)
    # keep invalid coordinates finite so grid_sample never sees inf/nan
    grid = torch.where(valid.unsqueeze(-1), grid, torch.full_like(grid, -2.0))
    z_n, y_n, x_n = config.grid
    grid = grid.reshape(*lead, z_n, y_n, x_n, 2).to(torch.float32)
    valid = valid.reshape(*lead, z_n, y_n, x_n).to(torch.float32)
    return grid, valid


def ring_rig(
    config: SimpleBEVConfig, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plausible camera ring: S cameras at 360/S-degree yaw steps around the reference camera.

    Returns ``(intrinsics [S,3,3] at the config image size, cam_to_ref [S,4,4])``. Camera 0 is
    the reference; intrinsics are those of a nuScenes front camera (1266 px focal at 1600x900)
    scaled to the image size.
    """
    h, w = config.image_size
    s = config.num_cameras
    k = torch.tensor(
        [[1266.4 * w / 1600, 0.0, 816.3 * w / 1600], [0.0, 1266.4 * h / 900, 491.5 * h / 900], [0, 0, 1]],
        dtype=dtype,
    )
    intr = k.expand(s, 3, 3).clone()
    poses = []
    for i in range(s):
        yaw = 2 * math.pi * i / s  # rotation about the (downward) y axis
        c, sn = math.cos(yaw), math.sin(yaw)
        t = torch.eye(4, dtype=dtype)
        t[:3, :3] = torch.tensor([[c, 0, sn], [0, 1, 0], [-sn, 0, c]], dtype=dtype)
        # cameras sit ~1 m from the rig centre along their viewing axis, rig centre 1 m behind cam0
        t[:3, 3] = torch.tensor([sn * 1.0, 0.0, c * 1.0 - 1.0], dtype=dtype)
        poses.append(t)
    return intr, torch.stack(poses)


# --------------------------------------------------------------------------
# ResNet pieces (own implementation, torchvision attribute names)
# --------------------------------------------------------------------------
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), out-of-place residual add. The output ReLU is a
    module of its own (``relu_out``; no parameters, so checkpoints are unchanged): every
    activation module is called once per forward, which hook-based attribution (Captum's
    DeepLift) needs."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu_out(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), out-of-place residual add."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


def _make_layer(block: type, cin: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    cout = planes * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
    layers = [block(cin, planes, stride, downsample)]
    layers += [block(cout, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), cout


def _init_resnet(module: nn.Module, zero_init_residual: bool) -> None:
    # torchvision's initialisation, so training from scratch behaves like the original
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


class UpsamplingConcat(nn.Module):
    """Bilinear x2 up-sampling of the deep map, concat [skip, up], two conv-IN-ReLU blocks."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.ReLU(),
        )

    def forward(self, x_to_upsample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = self.upsample(x_to_upsample)
        return self.conv(torch.cat([x, up], dim=1))


class UpsamplingAdd(nn.Module):
    """Bilinear x2 up-sampling, 1x1 conv, InstanceNorm, plus a skip connection."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.upsample_layer = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.InstanceNorm2d(cout),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor) -> torch.Tensor:
        return self.upsample_layer(x) + x_skip


class Encoder(nn.Module):
    """ResNet stem..layer3, layer3 up-sampled and fused with layer2, 1x1 conv to the latent."""

    def __init__(self, encoder: str, latent_dim: int):
        super().__init__()
        kind, counts = _ENCODERS[encoder]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        layer1, c1 = _make_layer(block, 64, 64, counts[0], 1)
        layer2, c2 = _make_layer(block, c1, 128, counts[1], 2)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            layer1,
            layer2,
        )
        self.layer3, c3 = _make_layer(block, c2, 256, counts[2], 2)
        self.depth_layer = nn.Conv2d(512, latent_dim, 1)
        self.upsampling_layer = UpsamplingConcat(c2 + c3, 512)
        _init_resnet(self.backbone, zero_init_residual=False)
        _init_resnet(self.layer3, zero_init_residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.backbone(x)
        x2 = self.layer3(x1)
        return self.depth_layer(self.upsampling_layer(x2, x1))


def _head(cin: int, cout: int, sigmoid: bool = False) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cin, 3, padding=1, bias=False),
        nn.InstanceNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1),
    ]
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """ResNet-18 style BEV decoder (layers 1..3), three up-and-add blocks, four heads."""

    def __init__(self, cin: int):
        super().__init__()
        self.first_conv = nn.Conv2d(cin, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1, _ = _make_layer(BasicBlock, 64, 64, 2, 1)
        self.layer2, _ = _make_layer(BasicBlock, 64, 128, 2, 2)
        self.layer3, _ = _make_layer(BasicBlock, 128, 256, 2, 2)
        self.up3_skip = UpsamplingAdd(256, 128)
        self.up2_skip = UpsamplingAdd(128, 64)
        self.up1_skip = UpsamplingAdd(64, cin)
        self.feat_head = _head(cin, cin)
        self.segmentation_head = _head(cin, 1)
        self.instance_offset_head = _head(cin, 2)
        self.instance_center_head = _head(cin, 1, sigmoid=True)
        # the original builds this from torchvision resnet18(zero_init_residual=True)
        _init_resnet(nn.ModuleList([self.bn1, self.layer1, self.layer2, self.layer3]), zero_init_residual=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skip1 = x
        x = self.relu(self.bn1(self.first_conv(x)))
        x = self.layer1(x)
        skip2 = x
        x = self.layer2(x)
        skip3 = x
        x = self.layer3(x)
        x = self.up3_skip(x, skip3)
        x = self.up2_skip(x, skip2)
        x = self.up1_skip(x, skip1)
        return {
            "segmentation": self.segmentation_head(x),
            "instance_center": self.instance_center_head(x),
            "instance_offset": self.instance_offset_head(x),
            "feat": self.feat_head(x),
        }


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
class SimpleBEV(nn.Module):
    """SimpleBEV BEV segmentation with camera plus optional radar / LiDAR BEV inputs.

    Inputs (B batch, S cameras, (H, W) image size, Z x Y x X grid of the config):
      - ``images`` [B, S, 3, H, W] in [-0.5, 0.5];
      - ``lift_grid`` [B, S, Z, Y, X, 2] and ``lift_valid`` [B, S, Z, Y, X] from :func:`lifting_grids`;
      - ``radar_bev`` [B, 16*Y or 1, Z, X] (channel f*Y + y) when radar is a modality;
      - ``lidar_bev`` [B, Y, Z, X] when LiDAR is a modality.
    Returns a dict: ``segmentation`` (logits) [B,1,Z,X], ``instance_center`` (sigmoid)
    [B,1,Z,X], ``instance_offset`` [B,2,Z,X], ``feat`` [B,latent,Z,X].
    """

    def __init__(self, config: SimpleBEVConfig):
        super().__init__()
        if not isinstance(config, SimpleBEVConfig):
            raise LMDError(f"SimpleBEV wants a SimpleBEVConfig, got {type(config).__name__}.")
        self.config = config
        self.use_radar = "radar" in config.modalities
        self.use_lidar = "lidar" in config.modalities
        c = config.latent_dim
        y = config.grid[1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self.encoder = Encoder(config.encoder, c)
        fused = c * y + config.radar_channels + config.lidar_channels
        self.bev_compressor = nn.Sequential(
            nn.Conv2d(fused, c, 3, padding=1, bias=False),
            nn.InstanceNorm2d(c),
            nn.GELU(),
        )
        self.decoder = Decoder(c)
        # loss-balancing scalars of the original (uncertainty weighting); kept for the checkpoint
        self.ce_weight = nn.Parameter(torch.tensor(0.0))
        self.center_weight = nn.Parameter(torch.tensor(0.0))
        self.offset_weight = nn.Parameter(torch.tensor(0.0))

    @property
    def modality_args(self) -> dict[str, str]:
        """Modality name -> forward parameter name, in config.modalities order."""
        return {m: _MODALITY_ARG[m] for m in self.config.modalities}

    @property
    def context_args(self) -> tuple[str, ...]:
        """Forward parameters that are calibration context, not modalities."""
        return ("lift_grid", "lift_valid")

    def forward(
        self,
        images: torch.Tensor,
        lift_grid: torch.Tensor,
        lift_valid: torch.Tensor,
        radar_bev: Optional[torch.Tensor] = None,
        lidar_bev: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        h, w = cfg.image_size
        s = cfg.num_cameras
        z, y, x = cfg.grid
        c = cfg.latent_dim
        # camera path: depends on images and the lifting context only
        rgb = images.reshape(-1, 3, h, w)
        rgb = (rgb + 0.5 - self.mean) / self.std
        feat = self.encoder(rgb)  # [B*S, C, Hf, Wf]
        grid = lift_grid.reshape(-1, z, y * x, 2)
        sampled = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(-1, s, c, z, y, x)
        valid = lift_valid.reshape(-1, s, 1, z, y, x)
        count = valid.sum(dim=1).clamp(min=1.0)
        feat_mem = (sampled * valid).sum(dim=1) / count  # [B, C, Z, Y, X]
        feat_bev = feat_mem.permute(0, 1, 3, 2, 4).reshape(-1, c * y, z, x)  # channel c*Y + y
        parts = [feat_bev]
        if self.use_radar:
            if radar_bev is None:
                raise LMDError("this SimpleBEV config uses radar: pass radar_bev [B, C_radar, Z, X].")
            parts.append(radar_bev)
        if self.use_lidar:
            if lidar_bev is None:
                raise LMDError("this SimpleBEV config uses LiDAR: pass lidar_bev [B, Y, Z, X].")
            parts.append(lidar_bev)
        fused = torch.cat(parts, dim=1) if len(parts) > 1 else feat_bev
        return self.decoder(self.bev_compressor(fused))

    def example_inputs(
        self, batch_size: int = 1, generator: Optional[torch.Generator] = None
    ) -> dict[str, torch.Tensor]:
        """Valid random inputs keyed by forward parameter name (6-camera ring rig, sparse BEV)."""
        cfg = self.config
        h, w = cfg.image_size
        s = cfg.num_cameras
        z, y, x = cfg.grid
        dev = self.mean.device
        out: dict[str, torch.Tensor] = {}
        out["images"] = torch.rand(batch_size, s, 3, h, w, generator=generator) - 0.5
        intr, c2r = ring_rig(cfg)
        grid, valid = lifting_grids(cfg, intr, c2r)
        out["lift_grid"] = grid.unsqueeze(0).expand(batch_size, *grid.shape).contiguous()
        out["lift_valid"] = valid.unsqueeze(0).expand(batch_size, *valid.shape).contiguous()
        if self.use_radar:
            if cfg.radar_mode == "metaradar":
                occ = (torch.rand(batch_size, 1, y, z, x, generator=generator) < 0.02).float()
                vals = torch.randn(batch_size, METARADAR_FEATURES, y, z, x, generator=generator)
                out["radar_bev"] = (occ * vals).reshape(batch_size, METARADAR_FEATURES * y, z, x)
            else:
                out["radar_bev"] = (torch.rand(batch_size, 1, z, x, generator=generator) < 0.05).float()
        if self.use_lidar:
            out["lidar_bev"] = (torch.rand(batch_size, y, z, x, generator=generator) < 0.05).float()
        return {k: v.to(dev) for k, v in out.items()}


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------
def _head_list(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{len(items)}: [{shown}]{more}" if items else "0"


def _torch_file_problem(path: str, exc: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in words."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped and not zipfile.is_zipfile(path):
        return f"is truncated: a torch.save zip archive whose end is missing ({size} bytes)"
    if zipped and isinstance(exc, pickle.UnpicklingError):  # outside a zip it means plain garbage
        return "holds objects other than tensors and plain containers, which torch.load(weights_only=True) refuses"
    lines = str(exc).strip().splitlines()
    return f"is damaged or not written by torch.save ({type(exc).__name__}: {lines[0] if lines else 'no message'})"


def read_torch_file(path: str | os.PathLike, what: str, remedy: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; a malformed file raises :class:`LMDError`.

    The message names the file as ``what`` (``"checkpoint"``, ``"world weights"``), says whether it
    is empty, truncated, holds refused objects or is not a torch file, and ends with ``remedy``.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing or unreadable, not malformed: the OS error says so
    except Exception as exc:  # a malformed file makes torch.load raise RuntimeError, KeyError, EOFError, ...
        raise LMDError(f"{what} {path!r} {_torch_file_problem(path, exc)}; {remedy}.") from exc


_CHECKPOINT_NAME = re.compile(r"model-(\d+)\.pth")


def latest_checkpoint(folder: str | os.PathLike) -> str:
    """The ``model-<step>.pth`` of ``folder`` (SimpleBEV's ``init_dir``) with the highest step.

    Steps compare as numbers: ``model-10.pth`` comes after ``model-9.pth`` and zero-padded
    names (``model-000010.pth``) mix with unpadded ones.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise LMDError(f"checkpoint folder {folder!r} does not exist or is not a folder.")
    steps = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT_NAME.fullmatch(name))]
    if not steps:
        raise LMDError(f"checkpoint folder {folder!r} holds no model-*.pth file with a step number "
                       "(model-<step>.pth); pass the checkpoint file itself.")
    return os.path.join(folder, max(steps)[1])


def _state_dict_problem(sd: Any) -> Optional[str]:
    """What keeps ``sd`` from being a state dict (names -> tensors), or None."""
    if not isinstance(sd, dict):
        return f"is a {type(sd).__name__}, not a dict"
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return f"maps {key!r} to a {type(value).__name__}"
    return None


def load_checkpoint(model: SimpleBEV, path: str | os.PathLike) -> dict:
    """Load a SimpleBEV checkpoint (a dict holding ``model_state_dict``) strictly into ``model``.

    A uniform ``module.`` prefix (left by DataParallel training) is stripped. Returns the
    whole checkpoint dict. Raises :class:`LMDError` naming the file when it is unreadable or
    malformed, and naming missing keys, unexpected keys and shape mismatches when the
    checkpoint does not fit the model's config. For a folder of checkpoints pass ``latest_checkpoint(folder)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LMDError(
            f"checkpoint file {path!r} does not exist; download the released SimpleBEV "
            "checkpoint (see docs/simplebev_nuscenes.md) or fix the path."
        )
    ckpt = read_torch_file(path, "checkpoint", "download or copy it again")
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise LMDError(
            f"checkpoint {path!r} has no 'model_state_dict' entry (found {keys}); SimpleBEV "
            "checkpoints are dicts {'model_state_dict': state_dict, ...}."
        )
    sd = ckpt["model_state_dict"]
    wrong = _state_dict_problem(sd)
    if wrong:
        raise LMDError(f"checkpoint {path!r}: its 'model_state_dict' {wrong}, where a state dict maps parameter "
                       "names to tensors.")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        cfg = model.config
        raise LMDError(
            f"checkpoint {path!r} does not match this SimpleBEV "
            f"(encoder={cfg.encoder}, modalities={cfg.modalities}, radar_mode={cfg.radar_mode}, "
            f"grid={cfg.grid}, latent_dim={cfg.latent_dim}). "
            f"Missing keys {_head_list(missing)}; unexpected keys {_head_list(unexpected)}; "
            f"shape mismatches {_head_list(shapes, 3)}. Build the model from the preset that "
            "matches the checkpoint (SimpleBEVConfig.released_radar() for the camera+radar "
            "checkpoint, released_camera() for camera-only)."
        )
    model.load_state_dict(sd, strict=True)
    return ckpt
