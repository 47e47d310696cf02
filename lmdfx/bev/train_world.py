"""Train the sensor-world SimpleBEV (the demo's default model) on CPU in a few minutes.

    python -m lmdfx.bev.train_world --out lmdfx/bev/weights/simplebev_world.pt

Only the layers of :func:`lmdfx.bev.weights.is_trained` learn; the rest keep the deterministic
initialisation, which lets the camera backbone's features be computed once per scene and makes
the saved file small. Loss: binary cross-entropy on the segmentation logits (positive weight
2.13 as in SimpleBEV), cells outside ``valid_mask`` ignored. BatchNorm stays in eval mode (a
trainable affine per channel), so the saved model behaves exactly as it trained.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmdfx.bev.iou import VehicleIoU
from lmdfx.bev.data.sensor_world import SensorWorld, world_config
from lmdfx.bev.weights import WORLD_WEIGHTS, _world_model, is_trained, save_world_weights
from lmdfx.metrics import progress_bar

__all__ = ["train", "main"]

POS_WEIGHT = 2.13  # SimpleBEV's positive-class weight for the segmentation BCE


class _CachedFeatures(nn.Module):
    """Stands in for the encoder during training: depth_layer on precomputed backbone features."""

    def __init__(self, depth_layer: nn.Module):
        super().__init__()
        self.depth_layer = depth_layer
        self.features: Optional[torch.Tensor] = None

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.depth_layer(self.features)


@torch.no_grad()
def _backbone_features(encoder: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    rgb = (images.reshape(-1, *images.shape[-3:]) + 0.5 - mean) / std
    x1 = encoder.backbone(rgb)
    return encoder.upsampling_layer(encoder.layer3(x1), x1)


def _seen_mask(scene: Any, sensor: str) -> torch.Tensor:
    """[1, Z, X] footprints of the vehicles that ``sensor`` saw."""
    mask = torch.zeros(scene.vehicle_gt.shape, dtype=torch.bool)
    for obj in scene.objects:
        if sensor in obj.seen_by:
            mask[0] |= torch.from_numpy(obj.mask)
    return mask.float()


def _collect(model: nn.Module, world: SensorWorld, batch: int, progress: bool) -> dict[str, torch.Tensor]:
    keys = ("features", "radar_bev", "vehicle_gt", "valid_mask", "camera_seen", "radar_seen")
    parts: dict[str, list] = {k: [] for k in keys}
    chunks = range(0, len(world), batch)
    for start in progress_bar(chunks, progress, f"features (seed {world.seed})", unit="batch"):
        scenes = [world.scene(i) for i in range(start, min(start + batch, len(world)))]
        images = torch.stack([sc.inputs["images"] for sc in scenes])
        parts["features"].append(_backbone_features(model.encoder, images, model.mean, model.std)
                                 .reshape(len(scenes), -1, *_backbone_shape(model)))
        parts["radar_bev"].append(torch.stack([sc.inputs["radar_bev"] for sc in scenes]))
        parts["vehicle_gt"].append(torch.stack([sc.vehicle_gt for sc in scenes]))
        parts["valid_mask"].append(torch.stack([sc.valid_mask for sc in scenes]))
        parts["camera_seen"].append(torch.stack([_seen_mask(sc, "camera") for sc in scenes]))
        parts["radar_seen"].append(torch.stack([_seen_mask(sc, "radar") for sc in scenes]))
    data = {k: torch.cat(v) for k, v in parts.items()}
    # backbone features of blank (mid-grey) images: what the camera sees when it is dropped
    blank = torch.zeros(1, model.config.num_cameras, 3, *model.config.image_size)
    data["blank_features"] = _backbone_features(model.encoder, blank, model.mean, model.std).reshape(
        1, -1, *_backbone_shape(model))
    return data


def _backbone_shape(model: nn.Module) -> tuple[int, int, int]:
    hf, wf = model.config.feature_size
    return (model.encoder.depth_layer.in_channels, hf, wf)


def _forward(model: nn.Module, cache: _CachedFeatures, data: dict, idx: torch.Tensor, world: SensorWorld,
             drop_camera: Optional[torch.Tensor] = None, drop_radar: Optional[torch.Tensor] = None) -> dict:
    cfg = model.config
    b = len(idx)
    feats = data["features"][idx]
    radar = data["radar_bev"][idx]
    if drop_camera is not None:
        feats = torch.where(drop_camera.reshape(b, 1, 1, 1, 1), data["blank_features"], feats)
    if drop_radar is not None:
        radar = radar * (~drop_radar).reshape(b, 1, 1, 1).to(radar.dtype)
    cache.features = feats.reshape(-1, *_backbone_shape(model))
    # the real forward runs from depth_layer on; images only fix the batch size here
    images = torch.zeros(b, cfg.num_cameras, 3, *cfg.image_size)
    grid = world.rig.lift_grid.expand(b, *world.rig.lift_grid.shape)
    valid = world.rig.lift_valid.expand(b, *world.rig.lift_valid.shape)
    return model(images=images, lift_grid=grid, lift_valid=valid, radar_bev=radar)


def _loss(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none",
                                             pos_weight=torch.tensor(POS_WEIGHT, dtype=logits.dtype))
    return (bce * valid).sum() / valid.sum().clamp(min=1.0)


def _iou(model: nn.Module, cache: _CachedFeatures, data: dict, world: SensorWorld) -> float:
    meter = VehicleIoU()
    with torch.no_grad():
        for start in range(0, len(world), 16):
            idx = torch.arange(start, min(start + 16, len(world)))
            out = _forward(model, cache, data, idx, world)
            meter.update(out["segmentation"], data["vehicle_gt"][idx], data["valid_mask"][idx])
    return meter.compute()


def train(out: str = str(WORLD_WEIGHTS), scenes: int = 480, val_scenes: int = 64, steps: int = 2000,
          batch: int = 8, lr: float = 2e-3, seed: int = 0, init_seed: int = 0, sensor_dropout: float = 0.4,
          p_camera_only: float = 0.3, p_radar_only: float = 0.15, camera_share: float = 0.5, progress: bool = True,
          log=print) -> nn.Module:
    """Train the world model on ``scenes`` scenes of seed ``seed`` and save it to ``out``.

    ``sensor_dropout``: chance per sample that one sensor is blanked; ``camera_share`` of those
    drops blank the camera, the rest the radar (0.5: evenly; 1.0: camera dropout only, which
    pushes the model to rely on the radar).
    ``p_camera_only``/``p_radar_only``: visibility mix of the training scenes (camera-only vehicles
    are the hardest, so they are over-represented). Validation IoU is measured on ``val_scenes``
    default-mix scenes of seed ``seed + 1``. Returns the model.
    """
    start = time.time()
    torch.manual_seed(seed)
    config = world_config()
    model = _world_model(config, init_seed).eval()
    train_world = SensorWorld(scenes, seed=seed, config=config, p_camera_only=p_camera_only,
                              p_radar_only=p_radar_only)
    val_world = SensorWorld(val_scenes, seed=seed + 1, config=config)
    train_data = _collect(model, train_world, 16, progress)
    val_data = _collect(model, val_world, 16, progress)
    log(f"backbone features for {scenes} + {val_scenes} scenes: {time.time() - start:.0f} s")
    encoder = model.encoder
    cache = _CachedFeatures(encoder.depth_layer)
    model.encoder = cache
    names = {id(p): n for n, p in model.named_parameters()}
    params = []
    for p in model.parameters():
        trainable = is_trained(names[id(p)])
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    # 30 warm-up steps, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    loop = progress_bar(range(steps), progress, "training", unit="step")
    running = None
    for step in loop:
        idx = torch.randint(0, scenes, (batch,), generator=gen)
        # sensor dropout: a dropped sensor's vehicles that only it saw leave the loss, so each
        # sensor learns to find vehicles alone
        u = torch.rand(batch, generator=gen)
        drop_camera = u < sensor_dropout * camera_share
        drop_radar = u > 1 - sensor_dropout * (1 - camera_share)
        out_heads = _forward(model, cache, train_data, idx, train_world, drop_camera, drop_radar)
        gt, valid = train_data["vehicle_gt"][idx], train_data["valid_mask"][idx]
        keep = torch.where(drop_camera.reshape(-1, 1, 1, 1), train_data["radar_seen"][idx],
                           torch.where(drop_radar.reshape(-1, 1, 1, 1), train_data["camera_seen"][idx], gt))
        loss = _loss(out_heads["segmentation"], gt, valid * (1 - gt * (1 - keep)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if progress and step % 10 == 0:
            loop.set_postfix(loss=f"{running:.3f}")
        elif not progress and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps}: loss {running:.3f} ({time.time() - start:.0f} s)")
    val_iou = _iou(model, cache, val_data, val_world)
    train_iou = _iou(model, cache, train_data, train_world)
    model.encoder = encoder
    for p in model.parameters():
        p.requires_grad_(True)
    seconds = time.time() - start
    meta = {"steps": steps, "batch": batch, "lr": lr, "train_scenes": scenes, "train_seed": seed,
            "sensor_dropout": sensor_dropout, "camera_share": camera_share, "p_camera_only": p_camera_only,
            "p_radar_only": p_radar_only,
            "val_scenes": val_scenes, "val_seed": seed + 1, "final_loss": running, "train_iou": train_iou,
            "val_iou": val_iou, "seconds": round(seconds, 1), "torch": str(torch.__version__)}
    save_world_weights(model, out, init_seed, meta)
    log(f"trained {steps} steps in {seconds:.0f} s: loss {running:.3f}, vehicle IoU train {100 * train_iou:.1f}, "
        f"val {100 * val_iou:.1f}; saved {out}")
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m lmdfx.bev.train_world [--out PATH] [--steps N] ...``."""
    parser = argparse.ArgumentParser(prog="python -m lmdfx.bev.train_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(WORLD_WEIGHTS),
                        help="where to write the weights (default: the shipped file)")
    parser.add_argument("--scenes", type=int, default=480, help="training scenes (seed --seed)")
    parser.add_argument("--val-scenes", type=int, default=64, help="validation scenes (seed --seed + 1)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sensor-dropout", type=float, default=0.4, help="chance a sample loses one sensor")
    parser.add_argument("--camera-share", type=float, default=0.5,
                        help="share of the dropped sensors that are the camera (default 0.5; 1: camera dropout only)")
    parser.add_argument("--p-camera-only", type=float, default=0.3,
                        help="chance a training vehicle is visible to the camera only")
    parser.add_argument("--p-radar-only", type=float, default=0.15,
                        help="chance a training vehicle is visible to the radar only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    train(args.out, args.scenes, args.val_scenes, args.steps, args.batch, args.lr, args.seed,
          sensor_dropout=args.sensor_dropout, p_camera_only=args.p_camera_only, p_radar_only=args.p_radar_only,
          camera_share=args.camera_share, progress=not args.no_progress and sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
