"""Small fusion networks shared by the core tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

C = 4  # channels after fusion
ACTIVATIONS = {
    "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1), "gelu": nn.GELU(), "silu": nn.SiLU(),
    "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "elu": nn.ELU(), "softplus": nn.Softplus(),
    "hardswish": nn.Hardswish(), "relu6": nn.ReLU6(), "mish": nn.Mish(),
}


def randomize_batchnorm(bn: nn.BatchNorm2d, generator: torch.Generator) -> None:
    """Give an eval-mode BatchNorm non-trivial statistics and affine parameters."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator, dtype=bn.running_var.dtype) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=generator, dtype=bn.weight.dtype))
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator, dtype=bn.bias.dtype))


class ProgramNet(nn.Module):
    """A fusion network built from a program: per-modality encoders, a fusion step, then
    a sequence of ops on a running value with skips to earlier values.

    ``program`` items are (op, argument) pairs; see ``step`` for the vocabulary. The forward
    takes four modality parameters; only the first ``len(in_channels)`` are used.
    """

    def __init__(self, in_channels: list[int], fusion: str, program: list[tuple[str, int]], encoders: bool):
        super().__init__()
        self.fusion_kind = fusion
        self.program = program
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, C, 3, padding=1), nn.ReLU()) if encoders else nn.Conv2d(c, C, 1)
            for c in in_channels
        )
        self.fuse = nn.Conv2d(C * len(in_channels), C, 3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        for op, arg in program:
            if op == "conv":
                layer = nn.Conv2d(C, C, 3, padding=1, bias=bool(arg % 2))
            elif op == "bn":
                layer = nn.BatchNorm2d(C)
            elif op == "in":
                layer = nn.InstanceNorm2d(C, affine=bool(arg % 2))
            elif op == "gn":
                layer = nn.GroupNorm(2, C)
            elif op == "ln":
                layer = nn.LayerNorm([8, 8])
            elif op == "act":
                layer = list(ACTIVATIONS.values())[arg % len(ACTIVATIONS)]
            elif op == "cat_skip":
                layer = nn.Conv2d(2 * C, C, 1)
            elif op == "gate":
                layer = nn.Conv2d(C, C, 1)
            else:
                layer = nn.Identity()
            self.layers.append(layer)

    def forward(self, x0, x1, x2, x3):
        inputs = [x0, x1, x2, x3][: len(self.encoders)]
        features = [encoder(x) for encoder, x in zip(self.encoders, inputs)]
        if self.fusion_kind == "cat":
            x = self.fuse(torch.cat(features, dim=1))
        else:
            x = features[0]
            for f in features[1:]:
                x = x + f
        history = [x]
        for (op, arg), layer in zip(self.program, self.layers):
            if op in ("conv", "bn", "in", "gn", "ln", "act"):
                x = layer(x)
            elif op == "maxpool_up":
                x = F.interpolate(F.max_pool2d(x, 2), scale_factor=2.0, mode="bilinear", align_corners=False)
            elif op == "avgpool_up":
                x = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
            elif op == "residual":
                x = x + history[arg % len(history)]
            elif op == "cat_skip":
                x = layer(torch.cat([x, history[arg % len(history)]], dim=1))
            elif op == "gate":
                x = x * torch.sigmoid(layer(x))
            elif op == "scale":
                x = x * 0.5 - 1.0
            elif op == "pure_add":
                x = x + features[arg % len(features)]
            elif op == "channel_max":
                x = x - x.amax(dim=1, keepdim=True)
            elif op == "mean_expand":
                x = x + x.mean(dim=(2, 3), keepdim=True).expand(-1, -1, 8, 8)
            history.append(x)
        return x

    def modality_args(self) -> dict[str, str]:
        return {f"m{i}": f"x{i}" for i in range(len(self.encoders))}


def make_program_net(in_channels, fusion, program, encoders, seed: int) -> ProgramNet:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ProgramNet(in_channels, fusion, program, encoders).double().eval()
    for layer in net.layers:
        if isinstance(layer, nn.BatchNorm2d):
            randomize_batchnorm(layer, generator)
    return net


def program_inputs(net: ProgramNet, seed: int, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [encoder[0].in_channels if isinstance(encoder, nn.Sequential) else encoder.in_channels
              for encoder in net.encoders]
    xs = [torch.randn(batch, c, 8, 8, generator=generator, dtype=torch.float64) for c in shapes]
    return xs + [torch.zeros(1, dtype=torch.float64)] * (4 - len(xs))


class PiecewiseLinearNet(nn.Module):
    """conv / BatchNorm / ReLU / max-pool / bilinear up-sampling / residual adds, with the
    modality inputs entering the fusion conv directly (so the network is piecewise linear in
    them and the tangent map is the oracle)."""

    def __init__(self, in_channels: list[int]):
        super().__init__()
        self.n = len(in_channels)
        self.fuse = nn.Conv2d(sum(in_channels), 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x0, x1, x2, x3):
        x = self.fuse(torch.cat([x0, x1, x2, x3][: self.n], dim=1))
        x = torch.relu(self.bn1(x))
        y = torch.relu(self.bn2(self.conv(x)))
        x = x + y
        z = F.max_pool2d(x, 2)
        z = torch.relu(self.down(z))
        z = F.interpolate(z, scale_factor=4.0, mode="bilinear", align_corners=False)
        return self.head(x + z)
