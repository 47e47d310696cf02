"""lmdfx.bev.evaluation: per-component vehicle IoU and evaluate(), both metric accumulators."""

from __future__ import annotations

import pytest
import torch

import lmdfx
from lmdfx.bev.evaluation import ComponentIoU, component_iou, evaluate
from test_metrics import ConvFusion, _dataset


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    model = ConvFusion().double().eval()
    return lmdfx.compile(model, {"camera": "cam", "radar": "radar"})


def test_component_iou_sums_counts(dec):
    data = _dataset(4)
    result = component_iou(dec, data)
    assert result.names == ("camera", "radar", "bias", "full")
    inter = torch.zeros(4, dtype=torch.float64)
    union = torch.zeros(4, dtype=torch.float64)
    for item in data:
        res = dec(cam=item["cam"][None], radar=item["radar"][None])
        maps = list(res.components["segmentation"]) + [res.output["segmentation"]]
        valid = item["valid_mask"][None] > 0
        gt = item["vehicle_gt"][None] > 0
        for c, logits in enumerate(maps):
            pred = logits > 0
            inter[c] += (pred & gt & valid).sum()
            union[c] += ((pred | gt) & valid).sum()
    torch.testing.assert_close(result.intersection, inter)
    torch.testing.assert_close(result.union, union)
    assert result.iou["full"] == pytest.approx(float(inter[3] / union[3]))
    assert "vehicle IoU" in result.table()
    with pytest.raises(lmdfx.LMDError, match="ground truth"):
        component_iou(dec, _dataset(2, gt=False))


def test_evaluate_combines_both(dec):
    ev = evaluate(dec, _dataset(4), shift=1, repeats=2)
    assert ev.separation.pairs == 8 and ev.iou is not None
    assert "Separation" in ev.markdown() and "IoU" in ev.markdown()
    d = ev.to_dict()
    assert d["separation"]["labels"] == [["Cp/C", "Cp/R"], ["Rp/C", "Rp/R"]]


def test_evaluate_iou_only_and_merge(dec):
    ev = evaluate(dec, _dataset(3), separation=False)
    assert ev.separation is None and isinstance(ev.iou, ComponentIoU) and ev.samples == 3
    assert "Separation" not in ev.markdown()
    merged = ComponentIoU(("camera", "radar"))
    merged.intersection, merged.union = ev.iou.intersection.clone(), ev.iou.union.clone()
    merged.merge(lambda tensors: [t.mul_(2) for t in tensors])  # two ranks that counted the same
    torch.testing.assert_close(merged.result().intersection, 2 * ev.iou.intersection)
    assert merged.iou == pytest.approx(ev.iou.iou)


def test_ground_truth_that_does_not_fit_the_head_is_an_error(dec):
    data = [dict(item, vehicle_gt=torch.ones(1, 5, 5)) for item in _dataset(2)]
    with pytest.raises(lmdfx.LMDError, match=r"does not fit head 'segmentation'"):
        component_iou(dec, data)
