"""Model-zoo builders: random-init models from timm, torchvision and transformers, wrapped so
that ``forward`` takes one argument per modality (M = 2) and returns tensors, at the sizes of
``SIZES`` (``tiny``: the tests in tests/zoo; ``base``: benchmarks/zoo.py). Nothing is
downloaded: every model is built from a config with random weights."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import lmdfx


def leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output."""
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def scale_of(tensors: list[torch.Tensor]) -> float:
    """max |t| over the tensors (1e-300 when all are empty or zero)."""
    return max([float(t.detach().abs().max()) for t in tensors if t.numel()] + [1e-300])


@dataclass
class Case:
    """One zoo model: ``build(dtype)`` returns the eval-mode model, ``inputs(seed, dtype)`` its
    keyword inputs (the forward's parameters)."""

    build: Callable[[torch.dtype], nn.Module]
    inputs: Callable[[int, torch.dtype], dict[str, Any]]
    modalities: Mapping[str, str]
    frontend: str = "auto"  # what compile is asked for
    expect_frontend: str = "fx"  # what dec.report().frontend must say
    export_inputs: bool = False  # pass example_inputs= (the forward's keyword inputs)
    compile_kwargs: dict | None = None
    moving: tuple[str, ...] | None = None  # modalities whose component moves with their input (default all)

    def compile(self, model: nn.Module, inputs: dict[str, Any], **kwargs: Any) -> lmdfx.Decomposer:
        """``lmdfx.compile`` with this case's modalities, frontend and example inputs."""
        extra = dict(self.compile_kwargs or {})
        if self.export_inputs:
            extra["example_inputs"] = dict(inputs)
        extra.update(kwargs)
        return lmdfx.compile(model, self.modalities, frontend=self.frontend, **extra)


@dataclass(frozen=True)
class Size:
    """``image``: side of the timm / torchvision inputs. transformers models: ``hidden`` size,
    ``layers`` per encoder, attention ``heads``, MLP ``intermediate`` size, ``hf_image`` side
    cut into ``patch``-pixel patches, ``text`` tokens, and ``regions`` visual features of
    ``region_dim`` (VisualBERT, LXMERT)."""

    image: int = 32
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 37
    hf_image: int = 32
    patch: int = 8
    text: int = 7
    regions: int = 5
    region_dim: int = 16

    @property
    def encoder(self) -> dict[str, int]:
        return {"hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "intermediate_size": self.intermediate}

    @property
    def positions(self) -> int:
        """max_position_embeddings of the text encoders (RoBERTa-style ids start at padding_idx + 1 = 2)."""
        return max(16, self.text + 2)


SIZES = {
    "tiny": Size(),
    "base": Size(image=224, hidden=512, layers=4, heads=8, intermediate=2048, hf_image=224, patch=16, text=64,
                 regions=100, region_dim=512),
}
TINY = SIZES["tiny"]


def _finish(model: nn.Module, dtype: torch.dtype, calibrate: dict[str, Any] | None = None) -> nn.Module:
    """eval mode and ``dtype``. With ``calibrate`` (a batch of keyword inputs), BatchNorm
    running statistics are first set from forward passes on random data (a random-init
    network with identity statistics can attenuate its input to nothing: its output then
    does not depend on the modalities and the separation check would be vacuous)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if calibrate is not None and bns:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in bns:  # affine parameters that are not the init's (1, 0)
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            model(**calibrate)
    return model.to(dtype).eval()


# -- early fusion of camera (3 channels) and lidar (2 channels) into a 5-channel image model --


class EarlyFusion(nn.Module):
    def __init__(self, net: nn.Module, key: str | None = None):
        super().__init__()
        self.net = net
        self.key = key

    def forward(self, camera, lidar):
        out = self.net(torch.cat([camera, lidar], 1))
        return out[self.key] if self.key is not None else out


def image_inputs(hw: int, batch: int = 1):
    def inputs(seed: int, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {"camera": torch.randn(batch, 3, hw, hw, generator=g).to(dtype),
                "lidar": torch.randn(batch, 2, hw, hw, generator=g).to(dtype)}
    return inputs


def calibration(hw: int) -> dict[str, Any]:
    return image_inputs(hw, batch=8)(100, torch.float32)


IMAGE_MODALITIES = {"camera": "camera", "lidar": "lidar"}


def timm_case(name: str, hw: int, fused_attn: bool | None = None, **kwargs: Any) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        import timm

        torch.manual_seed(0)
        net = timm.create_model(name, pretrained=False, in_chans=5, num_classes=4, **kwargs)
        if fused_attn is not None:
            for m in net.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = fused_attn
        return _finish(EarlyFusion(net), dtype, calibration(hw))
    return Case(build, image_inputs(hw), IMAGE_MODALITIES)


def timm_vit_case(size: Size, fused_attn: bool) -> Case:
    return timm_case("vit_tiny_patch16_224", size.image, img_size=size.image, fused_attn=fused_attn)


# -- torchvision ----------------------------------------------------------------------------


def _five_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution with 5 input channels (camera 3 + lidar 2)."""
    return nn.Conv2d(5, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None)


def torchvision_vit_case(size: Size) -> Case:
    """torchvision's VisionTransformer (the vit_b_16 class: nn.MultiheadAttention encoder
    blocks) at the transformers sizes (tiny: 32 px, patch 8, 2 layers, 2 heads, hidden 32)."""
    def build(dtype: torch.dtype) -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        net = VisionTransformer(image_size=size.hf_image, patch_size=size.patch, num_layers=size.layers,
                                num_heads=size.heads, hidden_dim=size.hidden, mlp_dim=2 * size.hidden, num_classes=4)
        net.conv_proj = _five_channel(net.conv_proj)
        nn.init.normal_(net.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
        return _finish(EarlyFusion(net), dtype)
    return Case(build, image_inputs(size.hf_image), IMAGE_MODALITIES)


def deeplab_case(size: Size) -> Case:
    """deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2) with a
    5-channel first convolution; output: the ``out`` segmentation logits."""
    def build(dtype: torch.dtype) -> nn.Module:
        from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

        torch.manual_seed(0)
        net = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)
        first = net.backbone["0"]
        first[0] = _five_channel(first[0])
        return _finish(EarlyFusion(net, key="out"), dtype, calibration(size.image))
    return Case(build, image_inputs(size.image), IMAGE_MODALITIES)


# -- transformers ---------------------------------------------------------------------------
# Configs from ``Size`` (tiny: hidden 32, 2 layers, 2 heads, image 32, patch 8, 7 tokens),
# vocabulary 99. A modality given as token ids (``input_ids``) is an integer input: lmdfx treats
# it, and everything computed from it alone (the embedding lookup), as that modality's pure
# value, so the text component starts at the embedding output.

VOCAB = 99
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _hf(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Random weights at unit scale: transformers' init (normal, std 0.02, zero biases) makes
    tiny models nearly constant (BLIP's match logits then move by 1e-10 with the image), so
    the separation check could not tell a modality's component from zero."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.to(dtype).eval()


def text_image_inputs(size: Size, batch: int = 1, image_key: str = "pixel_values"):
    def inputs(seed: int, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(1, VOCAB, (batch, size.text), generator=g),
                image_key: torch.randn(batch, 3, size.hf_image, size.hf_image, generator=g).to(dtype)}
    return inputs


TEXT_IMAGE = {"text": "input_ids", "image": "pixel_values"}


def _vision(size: Size) -> dict[str, int]:
    return {"image_size": size.hf_image, "patch_size": size.patch}


class CLIPLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        return self.model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image


def clip_case(size: Size, attn: str = "eager") -> Case:
    """CLIPModel, ``logits_per_image``; ``attn``: transformers' attention implementation."""
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel

        torch.manual_seed(0)
        text = {**size.encoder, "vocab_size": VOCAB, "max_position_embeddings": size.positions, "bos_token_id": 1,
                "eos_token_id": 2, "pad_token_id": 0}  # eos 2: pooled at the argmax token id (CLIP's original rule)
        config = CLIPConfig(text_config=text, vision_config={**size.encoder, **_vision(size)}, projection_dim=16)
        config._attn_implementation = attn
        return _hf(CLIPLogits(CLIPModel(config)), dtype)
    return Case(build, text_image_inputs(size), TEXT_IMAGE)


def with_full_pixel_mask(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> Any:
    """``model(input_ids, pixel_values)`` with every pixel valid (ViLT, BridgeTower take a mask)."""
    return model(input_ids=input_ids, pixel_values=pixel_values,
                 pixel_mask=torch.ones_like(pixel_values[:, 0], dtype=torch.long))


class ViltPooled(nn.Module):
    """ViltModel: text tokens and image patches in ONE joint transformer; output the pooled
    (first-token) representation and the joint hidden states' mean."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        out = with_full_pixel_mask(self.model, input_ids, pixel_values)
        return {"pooled": out.pooler_output, "mean": out.last_hidden_state.mean(1)}


def vilt_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import ViltConfig, ViltModel

        torch.manual_seed(0)
        config = ViltConfig(**size.encoder, **NO_DROPOUT, **_vision(size), vocab_size=VOCAB,
                            max_position_embeddings=size.positions, max_image_length=-1)
        return _hf(ViltPooled(ViltModel(config)), dtype)
    return Case(build, text_image_inputs(size), TEXT_IMAGE)


class ViltFromEmbeds(nn.Module):
    """ViltModel with its image embedding computed here, in patch order, instead of by
    ``ViltEmbeddings.visual_embed`` (data-dependent sizes from ``pixel_mask`` and a random
    permutation of the patches by ``torch.multinomial``); with a full pixel mask this is the
    same embedding up to the patch order, which the pooled output does not depend on. Text
    and image tokens are concatenated and mixed by ViltModel's own joint transformer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def image_embeds(self, pixel_values):
        emb, config = self.model.embeddings, self.model.config
        x = emb.patch_embeddings(pixel_values)
        batch, channels, h, w = x.shape
        side = config.image_size // config.patch_size
        spatial = emb.position_embeddings[:, 1:, :].transpose(1, 2).view(1, channels, side, side)
        pos = nn.functional.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)
        pos = pos.flatten(2).transpose(1, 2).expand(batch, -1, -1)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([emb.cls_token.expand(batch, -1, -1), x], dim=1)
        pos = torch.cat([emb.position_embeddings[:, :1, :].expand(batch, -1, -1), pos], dim=1)
        return x + pos

    def forward(self, input_ids, pixel_values):
        image = self.image_embeds(pixel_values)
        out = self.model(input_ids=input_ids, image_embeds=image,
                         pixel_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device))
        return {"pooled": out.pooler_output, "mean": out.last_hidden_state.mean(1)}


def vilt_embeds_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        return ViltFromEmbeds(vilt_case(size).build(dtype).model).eval()
    return Case(build, text_image_inputs(size), TEXT_IMAGE)


def _pooled_and_mean(out) -> dict[str, torch.Tensor]:
    return {"pooled": out.pooler_output, "mean": out.last_hidden_state.mean(1)}


class VisualBertWrap(nn.Module):
    """VisualBertModel: text tokens and precomputed visual embeddings (e.g. detector region
    features) concatenated into one BERT encoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, visual_embeds):
        return _pooled_and_mean(self.model(input_ids=input_ids, visual_embeds=visual_embeds))


def text_region_inputs(size: Size, key: str = "visual_embeds", pos: str | None = None):
    def inputs(seed: int, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        out = {"input_ids": torch.randint(1, VOCAB, (1, size.text), generator=g),
               key: torch.randn(1, size.regions, size.region_dim, generator=g).to(dtype)}
        if pos is not None:  # context (box coordinates): the same for every seed
            out[pos] = torch.rand(1, size.regions, 4, generator=torch.Generator().manual_seed(7)).to(dtype)
        return out
    return inputs


def visualbert_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import VisualBertConfig, VisualBertModel

        torch.manual_seed(0)
        config = VisualBertConfig(**size.encoder, **NO_DROPOUT, vocab_size=VOCAB,
                                  max_position_embeddings=size.positions, visual_embedding_dim=size.region_dim)
        return _hf(VisualBertWrap(VisualBertModel(config)), dtype)
    return Case(build, text_region_inputs(size), {"text": "input_ids", "vision": "visual_embeds"})


class LxmertWrap(nn.Module):
    """LxmertModel: a language encoder, an object-relationship encoder, and a cross-modality
    encoder with bidirectional cross-attention. ``visual_pos`` (boxes) is context."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, visual_feats, visual_pos):
        out = self.model(input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos)
        return {"pooled": out.pooled_output, "language": out.language_output.mean(1),
                "vision": out.vision_output.mean(1)}


def lxmert_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import LxmertConfig, LxmertModel

        torch.manual_seed(0)
        config = LxmertConfig(vocab_size=VOCAB, hidden_size=size.hidden, num_attention_heads=size.heads,
                              intermediate_size=size.intermediate, **NO_DROPOUT,
                              max_position_embeddings=size.positions, l_layers=size.layers, x_layers=size.layers,
                              r_layers=size.layers, visual_feat_dim=size.region_dim, visual_pos_dim=4,
                              num_qa_labels=3, num_object_labels=3, num_attr_labels=3)
        return _hf(LxmertWrap(LxmertModel(config)), dtype)
    return Case(build, text_region_inputs(size, "visual_feats", pos="visual_pos"),
                {"text": "input_ids", "vision": "visual_feats"})


class FlavaWrap(nn.Module):
    """FlavaModel: text and image encoders, then a multimodal transformer over both token
    sequences; output the multimodal pooled and mean embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, skip_multimodal_encoder=False)
        return {"pooled": out.multimodal_output.pooler_output, "mean": out.multimodal_embeddings.mean(1)}


def flava_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import FlavaConfig, FlavaModel

        torch.manual_seed(0)
        enc = size.encoder
        config = FlavaConfig(text_config=dict(enc, vocab_size=VOCAB, max_position_embeddings=size.positions),
                             image_config=dict(enc, **_vision(size)),
                             multimodal_config=dict(enc), image_codebook_config={"hidden_size": 8, "vocab_size": 16},
                             hidden_size=size.hidden, projection_dim=16, init_codebook=False)
        return _hf(FlavaWrap(FlavaModel(config)), dtype)
    return Case(build, text_image_inputs(size), TEXT_IMAGE)


class BlipITM(nn.Module):
    """BlipForImageTextRetrieval with the ITM head: a ViT image encoder, then a BERT text
    encoder whose layers cross-attend to the image tokens; output the match logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        return self.model(input_ids=input_ids, pixel_values=pixel_values, use_itm_head=True).itm_score


def blip_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import BlipConfig, BlipForImageTextRetrieval

        torch.manual_seed(0)
        enc = size.encoder
        config = BlipConfig(text_config=dict(enc, vocab_size=VOCAB, max_position_embeddings=size.positions,
                                             encoder_hidden_size=size.hidden, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0, sep_token_id=3),
                            vision_config=dict(enc, **_vision(size)), projection_dim=16,
                            image_text_hidden_size=16)
        return _hf(BlipITM(BlipForImageTextRetrieval(config)), dtype)
    return Case(build, text_image_inputs(size), TEXT_IMAGE)


class BridgeTowerWrap(nn.Module):
    """BridgeTowerModel: uni-modal encoders bridged layer by layer into a cross-modal
    encoder (co-attention between text and image tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values):
        out = with_full_pixel_mask(self.model, input_ids, pixel_values)
        return {"pooled": out.pooler_output, "text": out.text_features.mean(1), "image": out.image_features.mean(1)}


def bridgetower_case(size: Size) -> Case:
    def build(dtype: torch.dtype) -> nn.Module:
        from transformers import BridgeTowerConfig, BridgeTowerModel

        torch.manual_seed(0)
        enc = {"hidden_size": size.hidden, "num_hidden_layers": size.layers, "num_attention_heads": size.heads}
        config = BridgeTowerConfig(text_config=dict(enc, intermediate_size=size.intermediate, vocab_size=VOCAB,
                                                    max_position_embeddings=size.positions),
                                   # the vision tower has hidden // 64 heads
                                   vision_config=dict(enc, hidden_size=max(64, size.hidden), **_vision(size)),
                                   hidden_size=size.hidden, num_hidden_layers=size.layers,
                                   num_attention_heads=size.heads)
        return _hf(BridgeTowerWrap(BridgeTowerModel(config)), dtype)
    return Case(build, text_image_inputs(size), TEXT_IMAGE)


# -- the zoo: name -> Case ----------------------------------------------------------------------


def _export(case: Case) -> Case:
    """Capture with frontend='auto' and example inputs: fx first, torch.export when fx cannot
    trace (transformers models are not fx-traceable)."""
    case.frontend, case.export_inputs, case.expect_frontend = "auto", True, "export"
    return case


def _only_export(case: Case) -> Case:
    case.frontend, case.export_inputs, case.expect_frontend = "export", True, "export"
    return case


def _moving(case: Case, *names: str) -> Case:
    case.moving = names
    return case


def cases(size: Size = TINY) -> dict[str, Callable[[], Case]]:
    """name -> the zoo model's Case at ``size`` (built on demand: the libraries are optional)."""
    return {
        # timm, early fusion (fx)
        "timm-resnet18": lambda: timm_case("resnet18", size.image),
        "timm-convnext_atto": lambda: timm_case("convnext_atto", size.image),
        "timm-efficientnet_b0": lambda: timm_case("efficientnet_b0", size.image),
        "timm-mobilenetv3_small_100": lambda: timm_case("mobilenetv3_small_100", size.image),
        "timm-vit_tiny-fused_attn": lambda: timm_vit_case(size, fused_attn=True),
        "timm-vit_tiny-explicit_attn-fx": lambda: timm_vit_case(size, fused_attn=False),
        "timm-vit_tiny-explicit_attn-export": lambda: _only_export(timm_vit_case(size, fused_attn=False)),
        # torchvision, early fusion (fx)
        "torchvision-vit": lambda: torchvision_vit_case(size),
        "torchvision-deeplabv3_mobilenet_v3_large": lambda: deeplab_case(size),
        # transformers (auto -> export)
        # CLIP: the towers are pure until logits = scale · image_emb @ text_embᵀ; Rules(product="freeze")
        # gives that product to one operand (text), so only the text component moves with its input.
        "transformers-clip": lambda: _moving(_export(clip_case(size)), "text"),
        "transformers-clip-sdpa": lambda: _moving(_export(clip_case(size, "sdpa")), "text"),
        "transformers-vilt": lambda: _export(vilt_case(size)),
        "transformers-vilt-image_embeds": lambda: _export(vilt_embeds_case(size)),
        "transformers-visualbert": lambda: _export(visualbert_case(size)),
        "transformers-lxmert": lambda: _export(lxmert_case(size)),
        "transformers-flava": lambda: _export(flava_case(size)),
        "transformers-blip-itm": lambda: _export(blip_case(size)),
        "transformers-bridgetower": lambda: _export(bridgetower_case(size)),
    }


CASES = cases()  # the tiny zoo of tests/zoo

# The packages a family needs (timm imports torchvision).
NEEDS = {"timm": ("timm", "torchvision"), "torchvision": ("torchvision",), "transformers": ("transformers",)}


def missing(name: str) -> str | None:
    """Why zoo model ``name`` cannot be built here (a package is missing or does not import), or None."""
    for module in NEEDS[name.split("-")[0]]:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # e.g. timm beside a torchvision that does not match torch
            return f"{module} cannot be imported ({exc})"
    return None
