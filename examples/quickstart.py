"""Decompose a small camera–radar CNN and print each modality's share of the output.

Run: python examples/quickstart.py
"""

import torch
from torch import nn

import lmdfx


class CameraRadarNet(nn.Module):
    """Camera and radar encoders, concatenation fusion, a small decoder and a BEV head."""

    def __init__(self):
        super().__init__()
        self.camera_encoder = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.radar_encoder = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU())
        self.fusion = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.InstanceNorm2d(16), nn.GELU())
        self.decoder = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.MaxPool2d(2), nn.Upsample(scale_factor=2, mode="bilinear"))
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, image, radar):
        fused = self.fusion(torch.cat([self.camera_encoder(image), self.radar_encoder(radar)], dim=1))
        return self.head(self.decoder(fused) + fused)


def main() -> None:
    torch.manual_seed(0)
    model = CameraRadarNet().eval()
    image, radar = torch.rand(1, 3, 32, 32) - 0.5, torch.randn(1, 4, 32, 32)

    dec = lmdfx.compile(model, modalities={"camera": "image", "radar": "radar"}, record=["fusion", "decoder"])
    res = dec(image, radar)
    residual = (res.components.sum(0) - res.output).abs().max().item()
    print(f"output {tuple(res.output.shape)}; components {tuple(res.components.shape)}; "
          f"max |sum of components - output| = {residual:.2e}")

    # Share of the output: each component's summed absolute contribution over all pixels.
    magnitude = res.components.abs().flatten(1).sum(1)
    for name, value in zip(res.names, magnitude / magnitude.sum()):
        print(f"  {name:>6}: {100 * value.item():5.1f} % of the output")
    for layer, stack in res.layers.items():
        energy = stack.pow(2).flatten(1).sum(1)
        shares = ", ".join(f"{n} {100 * e.item() / energy.sum().item():.0f}%" for n, e in zip(res.names, energy))
        print(f"  layer {layer}: {shares}")

    # Separation: with the operating point frozen, new radar data leaves the camera component alone.
    moved = dec(image, torch.randn(1, 4, 32, 32), operating_point=res.operating_point)
    print("camera component unchanged after replacing the radar input:", torch.equal(moved["camera"], res["camera"]))


if __name__ == "__main__":
    main()
