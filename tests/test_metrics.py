"""lmdfx.metrics: per-map scores against numpy, the separation protocol on a model whose answer is
known, head selection, metric accumulators, exact modality Shapley values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lmdfx
from lmdfx import metrics


class ConvFusion(nn.Module):
    """Camera and radar encoders, concat + conv fusion, a BN/ReLU decoder and a two-head dict output."""

    def __init__(self):
        super().__init__()
        self.cam = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.rad = nn.Conv2d(2, 8, 1)
        self.fusion = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8), nn.GELU())
        self.dec = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.seg = nn.Conv2d(8, 1, 1)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, cam, radar):
        x = self.dec(self.fusion(torch.cat([self.cam(cam), self.rad(radar)], 1)))
        return {"segmentation": self.seg(x), "aux": self.aux(x)}


def _dataset(n: int, seed: int = 0, gt: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        item = {"cam": torch.randn(3, 12, 12, generator=g, dtype=torch.float64),
                "radar": torch.randn(2, 12, 12, generator=g, dtype=torch.float64)}
        if gt:
            item["vehicle_gt"] = (torch.rand(1, 12, 12, generator=g) > 0.6).double()
            item["valid_mask"] = (torch.rand(1, 12, 12, generator=g) > 0.1).double()
        items.append(item)
    return items


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    model = ConvFusion().double().eval()
    return lmdfx.compile(model, {"camera": "cam", "radar": "radar"})


def test_pearson_and_mse_match_numpy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
        b = 0.3 * a + b
        assert metrics.pearson(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
            np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
        assert metrics.mse(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(np.mean((a - b) ** 2), rel=1e-12)
    a = torch.randn(50)
    assert metrics.pearson(a, a) == 1.0
    assert metrics.pearson(a, -2 * a + 3) == pytest.approx(-1.0, abs=1e-12)
    assert metrics.pearson(a.float(), a.float()) == 1.0  # float32 maps are scored in float64


def test_pearson_constant_maps_are_defined():
    zeros = torch.zeros(3, 5)
    assert metrics.pearson(zeros, zeros) == 1.0  # unchanged constant map
    assert metrics.pearson(torch.full((3, 5), 2.0), torch.full((3, 5), 2.0 + 1e-15)) == 1.0  # equal to rounding
    assert metrics.pearson(torch.full((3, 5), 2.0), torch.full((3, 5), 3.0)) == 0.0  # different constants
    assert metrics.pearson(zeros, torch.randn(3, 5)) == 0.0  # one constant, one not
    assert metrics.mse(zeros, zeros) == 0.0
    with pytest.raises(lmdfx.LMDError, match="same shape"):
        metrics.pearson(torch.zeros(3), torch.zeros(4))


def test_labels_are_paper_style():
    assert metrics.labels(["camera", "radar"]) == ["C", "R"]
    assert metrics.labels(["camera", "cam2"]) == ["camera", "cam2"]


def test_separation_is_exact_at_a_frozen_operating_point(dec):
    data = _dataset(5)
    res = metrics.perturbation_matrix(dec, data, shift=1, repeats=3)
    assert res.names == ("camera", "radar")
    assert res.pairs == 15
    # Off-diagonal: replacing one modality leaves the other's component bit for bit unchanged.
    assert res.pcc[0, 1] == 1.0 and res.pcc[1, 0] == 1.0
    assert res.mse[0, 1] == 0.0 and res.mse[1, 0] == 0.0
    assert res.pcc_std[0, 1] == 0.0
    # Diagonal: the replaced modality's own component moves.
    assert res.pcc[0, 0] < 0.9 and res.pcc[1, 1] < 0.9
    assert res.mse[0, 0] > 0 and res.mse[1, 1] > 0
    assert res.per_sample_pcc.shape == (5, 2, 2)
    assert torch.allclose(res.per_sample_pcc.mean(0), res.pcc)  # equal partner counts
    table = res.table()
    for label in ("Cp/C", "Cp/R", "Rp/C", "Rp/R", "PCC", "MSE"):
        assert label in table
    assert res.label(1, 0) == "Rp/C"


def test_separation_protocol_matches_a_direct_computation(dec):
    data = _dataset(4, seed=3, gt=False)
    res = metrics.perturbation_matrix(dec, data, offsets=[1, 4, 6], head="aux")  # offset 4 == N: skipped
    assert res.pairs == 8 and res.offsets == (1, 4, 6)
    k = 2
    batch = {key: v[None] for key, v in data[k].items()}
    ref = dec(**batch)
    scores = []
    for off in (1, 6):  # partners (k + off) mod N at sample k's frozen operating point
        moved = dec(cam=batch["cam"], radar=data[(k + off) % 4]["radar"][None], operating_point=ref.operating_point)
        scores.append(metrics.pearson(ref.components["aux"][1], moved.components["aux"][1]))
    assert float(res.per_sample_pcc[k, 1, 1]) == pytest.approx(sum(scores) / 2, abs=1e-12)


def test_batched_items_and_to_inputs(dec):
    data = _dataset(3, gt=False)
    plain = metrics.perturbation_matrix(dec, data, shift=1, repeats=1)
    batched = [{k: v[None] for k, v in item.items()} for item in data]
    same = metrics.perturbation_matrix(dec, batched, shift=1, repeats=1)
    torch.testing.assert_close(plain.pcc, same.pcc, rtol=0, atol=1e-12)
    pairs = [(item["cam"], item["radar"]) for item in data]
    mapped = metrics.perturbation_matrix(dec, pairs, shift=1, repeats=1,
                                         to_inputs=lambda t: {"cam": t[0], "radar": t[1]})
    torch.testing.assert_close(plain.mse, mapped.mse, rtol=0, atol=1e-12)


def test_protocol_errors(dec):
    with pytest.raises(lmdfx.LMDError, match="onto itself"):
        metrics.perturbation_matrix(dec, _dataset(3), shift=3, repeats=2)
    with pytest.raises(lmdfx.LMDError, match="lacks the modality"):
        metrics.perturbation_matrix(dec, [{"cam": torch.zeros(3, 12, 12)}], shift=1, repeats=1)
    with pytest.raises(lmdfx.LMDError, match="no head"):
        metrics.perturbation_matrix(dec, _dataset(2), shift=1, repeats=1, head="nope")
    with pytest.raises(lmdfx.LMDError, match="empty"):
        metrics.perturbation_matrix(dec, [], shift=1, repeats=1)


def test_select_heads_and_the_whole_output():
    seg, aux = torch.arange(4.0).reshape(1, 1, 2, 2), torch.arange(8.0).reshape(1, 2, 2, 2)
    out = {"segmentation": seg, "aux": aux}
    assert metrics.select(out, "aux") is aux
    assert metrics.select((seg, aux), 1) is aux
    assert metrics.select(seg) is seg  # a tensor output is the whole output as is
    whole = metrics.select(out)  # tensor leaves flattened, in pytree (dict insertion) order
    torch.testing.assert_close(whole, torch.cat([seg.reshape(-1), aux.reshape(-1)]))
    stacked = {k: torch.stack([v, 2 * v]) for k, v in out.items()}  # a components tree: [components, ...]
    assert metrics.select(stacked, keep=1).shape == (2, 12)
    with pytest.raises(lmdfx.LMDError, match="no head 'nope'"):
        metrics.select(out, "nope")
    with pytest.raises(lmdfx.LMDError, match="dict key or tuple index"):
        metrics.select(seg, "segmentation")


def test_default_head_is_the_whole_output(dec):
    data = _dataset(3, gt=False)
    whole = metrics.perturbation_matrix(dec, data, shift=1, repeats=1)
    assert whole.head is None and whole.pcc[0, 1] == 1.0 and whole.mse[1, 0] == 0.0
    k, p = 0, 1
    batch = {key: v[None] for key, v in data[k].items()}
    ref = dec(**batch)
    moved = dec(cam=batch["cam"], radar=data[p]["radar"][None], operating_point=ref.operating_point)
    # camera component of both heads together, when the radar input moves
    both = [torch.cat([r.components["segmentation"][0].reshape(-1), r.components["aux"][0].reshape(-1)])
            for r in (ref, moved)]
    assert float(whole.per_sample_pcc[k, 1, 0]) == pytest.approx(metrics.pearson(*both), abs=1e-12)


class _Norm:
    """A metric written against the accumulator protocol: mean squared output over the samples."""

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)  # sum of mean squares, samples

    def update(self, sample):
        self.sums += torch.tensor([float(metrics.select(sample.reference.output, "segmentation").pow(2).mean()), 1.0],
                                  dtype=torch.float64)

    def merge(self, all_reduce):
        all_reduce([self.sums])

    def result(self):
        return float(self.sums[0] / self.sums[1])


def test_accumulate_feeds_every_metric_from_one_reference_pass(dec):
    data = _dataset(4, gt=False)
    seen = []
    separation = metrics.Separation(dec, len(data), metrics.partner_offsets(1, 2), head="segmentation")
    sep, norm = metrics.accumulate(dec, data, [separation, _Norm()], on_reference=lambda k, item, res: seen.append(k))
    assert seen == [0, 1, 2, 3]  # one reference call per sample
    torch.testing.assert_close(sep.pcc, metrics.perturbation_matrix(dec, data, shift=1, repeats=2,
                                                                     head="segmentation").pcc)
    with torch.no_grad():
        expected = sum(float(dec.model(cam=d["cam"][None], radar=d["radar"][None])["segmentation"].pow(2).mean())
                       for d in data) / 4
    assert norm == pytest.approx(expected, rel=1e-12)
    assert metrics.partner_offsets(offsets=[2, 5]) == (2, 5)
    with pytest.raises(lmdfx.LMDError, match="repeats"):
        metrics.partner_offsets(1, 0)


def test_shapley_is_exact_for_two_modalities(dec):
    item = {k: v[None] for k, v in _dataset(1, seed=5, gt=False)[0].items()}
    sh = metrics.modality_shapley(dec, item, head="segmentation")
    model = dec.model
    z = {k: torch.zeros_like(v) for k, v in item.items()}
    with torch.no_grad():
        f = {s: model(cam=(item if "c" in s else z)["cam"], radar=(item if "r" in s else z)["radar"])["segmentation"]
             for s in ("", "c", "r", "cr")}
    torch.testing.assert_close(sh.values[0], 0.5 * (f["c"] - f[""]) + 0.5 * (f["cr"] - f["r"]))
    torch.testing.assert_close(sh.values[1], 0.5 * (f["r"] - f[""]) + 0.5 * (f["cr"] - f["c"]))
    assert sh.residual < 1e-12
    summed = metrics.modality_shapley(dec, item, per_pixel=False, head="aux")
    assert summed.values.shape == (2,)
    ref = {k: v + 1 for k, v in item.items()}
    other = metrics.modality_shapley(dec, item, baseline=ref, head="segmentation")
    assert other.baseline == "reference sample" and other.residual < 1e-12


def test_shapley_three_modalities_efficiency():
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(3, 1, 1)

        def forward(self, a, b, c):
            x = torch.cat([a, b, c], 1)
            return torch.tanh(self.mix(x)) * (a + 1)

    torch.manual_seed(0)
    model = Three().double().eval()
    inputs = {k: torch.randn(1, 1, 4, 4, dtype=torch.float64) for k in "abc"}
    sh = metrics.modality_shapley(model, inputs, modalities={"a": "a", "b": "b", "c": "c"}, head=None)
    assert sh.values.shape == (3, 1, 1, 4, 4)
    assert sh.residual < 1e-12
    with pytest.raises(lmdfx.LMDError, match="modalities"):
        metrics.modality_shapley(model, inputs)
    assert not math.isnan(float(sh.values.sum()))
