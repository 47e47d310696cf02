"""Tri-modal models: the camera + radar + LiDAR attention fusion model and tri-modal SimpleBEV
decompose exactly (float64) and separate at a frozen operating point (3x3 PCC matrix)."""

from __future__ import annotations

import pytest
import torch
from lmd_checks import assert_separates, check_equality, perturbation_pcc

import lmdfx
from lmdfx.bev.models.attention_fusion import AttentionFusion, AttentionFusionConfig
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig
from lmdfx.bev.models.trimodal import TRIMODAL, simplebev_trimodal, trimodal_config

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def samples(model, count: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(D) for k, v in model.example_inputs(1, torch.Generator().manual_seed(seed)).items()}
            for seed in range(count)]


@pytest.fixture(scope="module")
def fusion() -> AttentionFusion:
    torch.manual_seed(0)
    return AttentionFusion().to(D).eval()


@pytest.fixture(scope="module")
def simplebev() -> SimpleBEV:
    torch.manual_seed(0)
    # two cameras and a 16x4x16 grid keep the CPU test fast; the architecture is the full one
    return simplebev_trimodal("tiny", num_cameras=2, grid=(16, 4, 16)).to(D).eval()


def test_attention_fusion_interface(fusion):
    assert fusion.modality_args == {"camera": "camera", "radar": "radar", "lidar": "lidar"}
    x = fusion.example_inputs(2, torch.Generator().manual_seed(0))
    assert set(x) == {"camera", "radar", "lidar"} and all(v.dtype == D for v in x.values())
    assert fusion(**x).shape == (2, 1, *fusion.config.bev_grid)
    with pytest.raises(lmdfx.LMDError, match="divisible"):
        AttentionFusionConfig(embed_dim=30, heads=4)


def test_attention_fusion_is_exact_at_every_layer(fusion):
    dec = lmdfx.compile(fusion, fusion.modality_args, record="all")
    res = check_equality(dec, fusion, samples(fusion)[0])
    rules = {row.rule for row in dec.report().rows if row.kind == "mixed"}
    assert {"freeze", "ratio", "secant"} <= rules  # attention, LayerNorm, GELU/ReLU
    # x = Σ_m cross_attn_m(queries, tokens_m) + queries: each cross-attention result is wholly
    # its modality's, the learned queries (a parameter) are exactly the bias component
    fused = res.layers["add_8"]
    assert torch.equal(fused[-1], fusion.bev_queries.detach().expand_as(fused[-1]))
    for i, name in enumerate(fusion.modality_args):
        assert torch.equal(fused[i], res.layers[f"cross_attn.{name}"][0][i])


def test_attention_fusion_separates_three_modalities(fusion):
    # softmax=freeze makes every attention weight a constant; no product of two decomposed
    # values remains, so the default shapley product rule is never used and separation is exact.
    dec = lmdfx.compile(fusion, fusion.modality_args)
    assert not any(row.rule == "shapley" for row in dec.report().rows)
    first, second = samples(fusion)
    assert_separates(perturbation_pcc(dec, first, second, fusion.modality_args))


def test_attention_fusion_secant_attention_is_exact(fusion):
    dec = lmdfx.compile(fusion, fusion.modality_args, rules=lmdfx.Rules(softmax="secant", bias_split="ratio"))
    check_equality(dec, fusion, samples(fusion)[0])


def test_trimodal_simplebev_config():
    assert trimodal_config().modalities == TRIMODAL
    assert trimodal_config("paper").image_size == (224, 400)
    assert trimodal_config("full", radar_mode="occupancy").radar_channels == 1
    with pytest.raises(lmdfx.LMDError, match="preset"):
        trimodal_config("huge")
    model = SimpleBEV(SimpleBEVConfig.tiny(modalities=TRIMODAL))
    assert model.modality_args == {"camera": "images", "radar": "radar_bev", "lidar": "lidar_bev"}


def test_trimodal_simplebev_is_exact_and_separates(simplebev):
    dec = lmdfx.compile(simplebev, simplebev.modality_args, record=["bev_compressor", "decoder.layer1"])
    first, second = samples(simplebev)
    res = check_equality(dec, simplebev, first)
    fused = res.layers["bev_compressor"]
    assert fused.shape[0] == 4 and all(fused[i].abs().sum() > 0 for i in range(3))
    assert_separates(perturbation_pcc(dec, first, second, simplebev.modality_args))
