"""A small camera + radar + LiDAR BEV fusion transformer, written to be torch.fx traceable.

Per-modality encoders turn each input into tokens (with learned positional embeddings);
learned BEV query tokens cross-attend to each modality's tokens (one ``nn.MultiheadAttention``
per modality, so each result belongs to one modality); the fused query stream runs through a
pre-norm transformer block (self-attention, GELU MLP) and a joint cross-attention over the
concatenation of all modality tokens (``F.scaled_dot_product_attention``); a BEV head turns
the query grid into segmentation logits.

With ``lmdfx.Rules(softmax="freeze")`` (the default) every attention weight is an
operating-point constant, so the linearised model is linear in each modality's tokens and a
frozen operating point separates the modalities exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmdfx.errors import LMDError

__all__ = ["AttentionFusion", "AttentionFusionConfig", "JointCrossAttention", "PreNormBlock"]

MODALITIES = ("camera", "radar", "lidar")


@dataclass(frozen=True)
class AttentionFusionConfig:
    """Sizes of an :class:`AttentionFusion` model (defaults: a CPU-test size)."""

    image_size: tuple[int, int] = (32, 64)  # camera (H, W)
    bev_grid: tuple[int, int] = (32, 32)  # radar / LiDAR / output (Z, X)
    radar_channels: int = 2
    lidar_channels: int = 4
    patch: int = 8  # encoder stride (camera and BEV)
    query_grid: tuple[int, int] = (8, 8)  # BEV query tokens (Z, X)
    embed_dim: int = 32
    heads: int = 4
    mlp_ratio: int = 2

    def __post_init__(self) -> None:
        if self.embed_dim % self.heads:
            raise LMDError(f"embed_dim {self.embed_dim} must be divisible by heads {self.heads}.")
        for name, size in (("image_size", self.image_size), ("bev_grid", self.bev_grid)):
            if len(size) != 2 or any(s % self.patch or s <= 0 for s in size):
                raise LMDError(f"{name} {size} must be two positive multiples of patch={self.patch}.")
        if self.patch % 2:
            raise LMDError(f"patch {self.patch} must be even (encoders down-sample by patch/2, then 2).")

    def tokens(self, modality: str) -> int:
        """Number of tokens a modality's encoder produces."""
        h, w = self.image_size if modality == "camera" else self.bev_grid
        return (h // self.patch) * (w // self.patch)


def _encoder(channels: int, dim: int, patch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, dim, patch // 2, stride=patch // 2),
        nn.ReLU(),
        nn.Conv2d(dim, dim, 2, stride=2),
    )


class PreNormBlock(nn.Module):
    """x + SelfAttention(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h + pos, h + pos, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class JointCrossAttention(nn.Module):
    """Multi-head cross-attention from queries to a token sequence via
    ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self._split(self.to_q(self.norm(x)))
        k, v = self._split(self.to_k(tokens)), self._split(self.to_v(tokens))
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(1, 2).reshape(b, n, d))


class AttentionFusion(nn.Module):
    """Camera + radar + LiDAR BEV segmentation by attention fusion.

    Inputs: ``camera`` [B, 3, H, W], ``radar`` [B, C_radar, Z, X], ``lidar`` [B, C_lidar, Z, X].
    Returns segmentation logits [B, 1, Z, X].
    """

    def __init__(self, config: AttentionFusionConfig | None = None):
        super().__init__()
        config = config if config is not None else AttentionFusionConfig()
        if not isinstance(config, AttentionFusionConfig):
            raise LMDError(f"AttentionFusion wants an AttentionFusionConfig, got {type(config).__name__}.")
        self.config = config
        d, qz, qx = config.embed_dim, *config.query_grid
        channels = {"camera": 3, "radar": config.radar_channels, "lidar": config.lidar_channels}
        self.encoders = nn.ModuleDict({m: _encoder(channels[m], d, config.patch) for m in MODALITIES})
        self.positions = nn.ParameterDict(
            {m: nn.Parameter(0.02 * torch.randn(1, config.tokens(m), d)) for m in MODALITIES}
        )
        self.bev_queries = nn.Parameter(0.02 * torch.randn(qz * qx, d))
        self.query_pos = nn.Parameter(0.02 * torch.randn(1, qz * qx, d))
        self.cross_attn = nn.ModuleDict({m: nn.MultiheadAttention(d, config.heads, batch_first=True)
                                         for m in MODALITIES})
        self.block = PreNormBlock(d, config.heads, config.mlp_ratio)
        self.joint = JointCrossAttention(d, config.heads)
        self.head_norm = nn.LayerNorm(d)
        self.head_proj = nn.Linear(d, d)
        self.head = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.ReLU(), nn.Conv2d(d, 1, 1))

    @property
    def modality_args(self) -> dict[str, str]:
        """Modality name -> forward parameter name (the order of ``lmdfx.compile``'s components)."""
        return {m: m for m in MODALITIES}

    def _tokens(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self.encoders[modality](x).flatten(2).transpose(1, 2) + self.positions[modality]

    def forward(self, camera: torch.Tensor, radar: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        qz, qx = cfg.query_grid
        tokens = [self._tokens(m, x) for m, x in zip(MODALITIES, (camera, radar, lidar))]
        queries = self.bev_queries.unsqueeze(0).expand(camera.shape[0], -1, -1)
        attended = [self.cross_attn[m](queries + self.query_pos, t, t)[0] for m, t in zip(MODALITIES, tokens)]
        # Sum the per-modality results before adding the queries, so the (parameter) queries
        # enter a mixed value and belong to the bias component, not to the first modality.
        x = attended[0] + attended[1] + attended[2]
        x = x + queries
        x = self.block(x, self.query_pos)
        x = self.joint(x, torch.cat(tokens, dim=1))  # token concatenation across modalities
        x = self.head_proj(self.head_norm(x))
        bev = x.transpose(1, 2).reshape(-1, cfg.embed_dim, qz, qx)
        bev = F.interpolate(bev, size=cfg.bev_grid, mode="bilinear", align_corners=False)
        return self.head(bev)

    def example_inputs(self, batch_size: int = 1,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random inputs keyed by forward parameter name, in the model's dtype and device."""
        cfg = self.config
        z, x = cfg.bev_grid
        param = self.bev_queries
        camera = torch.rand(batch_size, 3, *cfg.image_size, generator=generator) - 0.5
        occupied = (torch.rand(batch_size, 1, z, x, generator=generator) < 0.1).float()
        radar = occupied * torch.randn(batch_size, cfg.radar_channels, z, x, generator=generator)
        lidar = (torch.rand(batch_size, cfg.lidar_channels, z, x, generator=generator) < 0.1).float()
        out = {"camera": camera, "radar": radar, "lidar": lidar}
        return {k: v.to(dtype=param.dtype, device=param.device) for k, v in out.items()}
