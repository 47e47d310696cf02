"""SimpleBEV through lmdfx: the tiny model decomposes exactly and separates at a frozen point."""

from __future__ import annotations

import torch

import lmdfx
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig


def test_tiny_simplebev_decomposes_exactly_and_separates():
    torch.manual_seed(0)
    model = SimpleBEV(SimpleBEVConfig.tiny()).double().eval()
    inputs = model.example_inputs(batch_size=1, generator=torch.Generator().manual_seed(0))
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    dec = lmdfx.compile(model, model.modality_args, record=["bev_compressor", "decoder.layer1"], exact_output=True)
    res = dec(**inputs)
    expected = model(**inputs)
    assert res.names == (*model.modality_args, "bias")
    for head, value in expected.items():
        assert torch.equal(res.output[head], value)
        stack = res.components[head]
        scale = stack.abs().sum(0).max()
        assert (stack.sum(0) - value).abs().max() <= 1e-9 * scale, head
    report = dec.report()
    assert report.max_relative_residual < 1e-9
    # Everything before the fusion cat runs once: the camera encoder and lifting are pure camera.
    kinds = {row.layer: row.kind for row in report.rows if row.layer.startswith("encoder")}
    assert set(kinds.values()) == {"pure"}
    # Frozen operating point: replacing the radar input leaves the camera component unchanged.
    other = model.example_inputs(batch_size=1, generator=torch.Generator().manual_seed(1))
    swapped = dict(inputs, radar_bev=other["radar_bev"].double())
    moved = dec(**swapped, operating_point=res.operating_point)
    torch.testing.assert_close(moved["camera"]["segmentation"], res["camera"]["segmentation"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(moved["radar"]["segmentation"], res["radar"]["segmentation"])
