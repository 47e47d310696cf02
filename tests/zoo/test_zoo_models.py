"""Model zoo: every model is compiled (the frontend that ran is asserted), its components
sum to the original model's output in float64 (atol 1e-9 · max|output|), and at a frozen
operating point with ``Rules(product="freeze")`` replacing one modality's input leaves the
other modality's component where it was (1e-9), in both directions, M = 2.

timm and torchvision models are early-fusion: ``forward(camera [B,3,H,W], lidar [B,2,H,W]) =
net(torch.cat([camera, lidar], 1))`` with a 5-channel first layer. transformers models take
``input_ids`` (text) and an image or visual features. A modality given as token ids is an
integer input: lmdfx treats it, and what is computed from it alone (the embedding lookup), as
that modality's pure value, so its component starts at the embedding output.

A test marked ``xfail(strict=True)`` records an lmdfx gap (the reason names it; the repros are
in the report of issue 12): it turns into a failure, to be unmarked, once the core is fixed."""

from __future__ import annotations

import pytest
import torch
from zoo_checks import check_exact, check_separation

import lmdfx
from benchmarks.zoo_models import CASES, leaves, missing, scale_of

pytestmark = pytest.mark.usefixtures("one_thread")

# -- the lmdfx gaps the zoo finds ---------------------------------------------------------------

VILT_EMBED = pytest.mark.xfail(
    strict=True, raises=lmdfx.TraceError,
    reason="ViltModel(pixel_values): transformers models are not fx-traceable, and export cannot capture "
           "ViltEmbeddings.visual_embed (loops over data-dependent sizes from pixel_mask, multinomial); the export "
           "frontend has no opaque leaf for such a pure-modality submodule")

GAPS = {
    "transformers-vilt": VILT_EMBED,
}

# Models whose modalities meet inside a joint/cross-modal transformer: the decomposition must
# happen there (mixed nodes with rules inside it), not around one opaque leaf.
JOINT = {
    "transformers-vilt-image_embeds": "model.encoder.layer.",
    "transformers-visualbert": "model.encoder.layer.",
    "transformers-lxmert": "model.encoder.x_layers.",
    "transformers-flava": "model.multimodal_model.encoder.layer",
    "transformers-blip-itm": "model.text_encoder.encoder.layer",
    "transformers-bridgetower": "model.cross_modal_",
}


def params():
    for name in CASES:
        marks = [GAPS[name]] if name in GAPS else []
        yield pytest.param(name, marks=marks, id=name)


def case_for(name: str):
    why = missing(name)
    if why is not None:
        pytest.skip(f"{why}; the timm and torchvision models need the matched pair torch==2.14.1 "
                    "torchvision==0.29.1 (README, Model zoo)")
    return CASES[name]()


@pytest.mark.parametrize("name", params())
def test_exact(name):
    case = case_for(name)
    dec = check_exact(case)
    if name in JOINT:
        rows = [row for row in dec.report().rows if row.layer.startswith(JOINT[name])]
        inside = [row for row in rows if row.kind == "mixed"]
        # attention weights computed from both modalities (frozen at the operating point by default)
        weights = [row for row in rows if row.op == "softmax" and len(row.provenance) == 2]
        assert len(inside) >= 10 and "matmul" in {row.op for row in inside} and weights, \
            f"{name}: the modalities are not decomposed inside the joint transformer {JOINT[name]!r}"


@pytest.mark.parametrize("name", params())
def test_separation(name):
    check_separation(case_for(name))


# CLIP's logit is a product of the two towers' embeddings, neither a gate nor bias-only: the
# default (gate) splits it and says so at compile time (Rules(product="freeze") separates it).
SPLIT_BY_DEFAULT = {"transformers-clip": "matmul", "transformers-clip-sdpa": "matmul"}


@pytest.mark.parametrize("name", params())
def test_default_rules_separate(name):
    """The default rules separate, with every modality component at least 1 % of the bias
    component's size; or compile names the product that does not."""
    case = case_for(name)
    if name in SPLIT_BY_DEFAULT:
        model, inputs = case.build(torch.float64), case.inputs(0, torch.float64)
        with pytest.warns(UserWarning, match="will not separate"):
            dec = case.compile(model, inputs)
        assert [row.op for row in dec.report().non_separating] == [SPLIT_BY_DEFAULT[name]]
        return
    res = check_separation(case, lmdfx.Rules())
    bias = scale_of(leaves(res["bias"]))
    for modality in case.modalities:
        assert scale_of(leaves(res[modality])) >= 0.01 * bias, f"{modality}'s component is degenerate"
