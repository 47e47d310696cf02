"""Attention rules: manual attention, F.scaled_dot_product_attention, nn.MultiheadAttention,
transformer layers as leaves, a pre-norm block; equality at every layer, separation at a
frozen operating point, and the Shapley product against the subset formula."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from lmd_checks import RTOL, assert_separates, check_equality, perturbation_pcc, tensors
from torch import nn

import lmdfx
from lmdfx.bev.models.attention_fusion import PreNormBlock
from lmdfx.rules.registry import Rules

D = torch.float64
B, N, E = 2, 5, 8  # batch, tokens per modality, embedding
MODS = {"camera": "a", "radar": "b", "lidar": "c"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(seed: int, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(B, n, E, generator=g, dtype=D) for p in MODS.values()}


def build(cls, *args, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(D).eval()


def run_checks(model: nn.Module, rules: Rules | None = None, separation: bool = True,
               moving: tuple[int, ...] | None = None) -> lmdfx.Decomposition:
    """Equality at every layer; with ``separation``, the frozen-point PCC matrix (``moving``:
    the modalities whose own component must change when their input does; default all)."""
    dec = lmdfx.compile(model, MODS, rules=rules, record="all")
    res = check_equality(dec, model, tokens(0))
    if separation:
        assert_separates(perturbation_pcc(dec, tokens(0), tokens(1), MODS), moving)
    return res


def remainders(res: lmdfx.Decomposition) -> list[float]:
    """The rounding remainders the attention rules put in the bias (their re-computation vs the op)."""
    return [float(c["remainder"].abs().max()) for c in res.operating_point.constants.values()
            if isinstance(c, dict) and "remainder" in c and "weights" in c]


# -- manual attention ------------------------------------------------------------------------


class ManualAttention(nn.Module):
    """softmax(q kᵀ / √d) v with q, k, v from three different modalities."""

    def forward(self, a, b, c):
        p = torch.softmax(a @ b.transpose(-2, -1) / math.sqrt(E), dim=-1)
        return p @ c


class FusedManualAttention(nn.Module):
    """Self-attention over the concatenated tokens of all modalities (q, k, v all mixed)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)

    def forward(self, a, b, c):
        t = torch.cat([a, b, c], dim=1)
        p = torch.softmax(self.q(t) @ self.k(t).transpose(-2, -1) / math.sqrt(E), dim=-1)
        return p @ self.v(t)


@pytest.mark.parametrize("cls", [ManualAttention, FusedManualAttention])
@pytest.mark.parametrize("product", ["shapley", "freeze"])
def test_manual_attention_is_exact_and_separates_with_frozen_softmax(cls, product):
    # softmax=freeze: P is a bias-only constant, so P @ v is linear in v under either product
    # rule. With q, k, v from three modalities only v's (lidar) reaches the output.
    res = run_checks(build(cls), Rules(product=product), moving=(2,) if cls is ManualAttention else None)
    if cls is ManualAttention:
        assert torch.all(res.components[:2] == 0) and res.components[2].abs().sum() > 0


def test_manual_attention_secant_softmax_is_exact():
    run_checks(build(FusedManualAttention), Rules(softmax="secant"), separation=False)


# -- F.scaled_dot_product_attention ----------------------------------------------------------


class SDPA(nn.Module):
    def __init__(self, heads: int = 2, **options):
        super().__init__()
        self.heads, self.options = heads, options
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)

    def split(self, x):
        return x.view(B, -1, self.heads, E // self.heads).transpose(1, 2)

    def forward(self, a, b, c):
        t = torch.cat([a, b, c], dim=1)
        q, k, v = self.split(self.q(t)), self.split(self.k(t)), self.split(self.v(t))
        return F.scaled_dot_product_attention(q, k, v, **self.options).transpose(1, 2).reshape(B, -1, E)


_allowed = torch.rand(3 * N, 3 * N, generator=torch.Generator().manual_seed(3)) > 0.4
_allowed.fill_diagonal_(True)
SDPA_OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool mask": {"attn_mask": _allowed},
    "float mask, scale": {"attn_mask": torch.randn(3 * N, 3 * N, generator=torch.Generator().manual_seed(4),
                                                   dtype=D), "scale": 0.3},
}


@pytest.mark.parametrize("options", SDPA_OPTIONS.values(), ids=SDPA_OPTIONS.keys())
def test_sdpa_freeze_is_exact_and_separates(options):
    res = run_checks(build(SDPA, **options))
    assert remainders(res) and max(remainders(res)) < 1e-13


@pytest.mark.parametrize("options", SDPA_OPTIONS.values(), ids=SDPA_OPTIONS.keys())
def test_sdpa_secant_is_exact(options):
    res = run_checks(build(SDPA, **options), Rules(softmax="secant"), separation=False)
    rule_remainder = res.operating_point.constants["scaled_dot_product_attention"]["remainder"]
    assert rule_remainder.abs().max() < 1e-13
    # with frozen products (K and V frozen) the secant decomposition separates again
    run_checks(build(SDPA, **options), Rules(softmax="secant", product="freeze"))


def test_sdpa_weights_match_the_masked_softmax():
    model = build(SDPA, attn_mask=_allowed, is_causal=True)
    try:
        model(**tokens(0))
    except RuntimeError as exc:  # torch >= 2.14 refuses an attn_mask together with is_causal=True
        pytest.skip(f"this torch ({torch.__version__}) refuses the combination: {str(exc).splitlines()[0]}")
    res = lmdfx.compile(model, MODS)(**tokens(0))
    weights = res.operating_point.constants["scaled_dot_product_attention"]["weights"]
    assert torch.all(weights[..., ~(_allowed & torch.ones_like(_allowed).tril())] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_sdpa_with_dropout_is_refused():
    with pytest.raises(lmdfx.LMDError, match="dropout_p"):
        lmdfx.compile(build(SDPA, dropout_p=0.1), MODS)


# -- nn.MultiheadAttention -------------------------------------------------------------------


class MHA(nn.Module):
    """Self-attention over the concatenated modality tokens by an nn.MultiheadAttention leaf."""

    def __init__(self, batch_first: bool = True, padding: bool = False, mask: bool = False,
                 need_weights: bool = True, average: bool = True, **module_options):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 2, batch_first=batch_first, **module_options)
        self.batch_first, self.padding, self.mask = batch_first, padding, mask
        self.need_weights, self.average = need_weights, average
        pad = torch.zeros(B, 3 * N, dtype=torch.bool)
        pad[0, -2:] = True
        pad[1, :3] = True
        self.register_buffer("pad", pad)
        self.register_buffer("blocked", ~_allowed)

    def forward(self, a, b, c):
        t = torch.cat([a, b, c], dim=1)
        t = t if self.batch_first else t.transpose(0, 1)
        out, weights = self.mha(t + 0.5, t, 2.0 * t, key_padding_mask=self.pad if self.padding else None,
                                attn_mask=self.blocked if self.mask else None, need_weights=self.need_weights,
                                average_attn_weights=self.average)
        out = out if self.batch_first else out.transpose(0, 1)
        return (out, weights) if self.need_weights else out


MHA_CASES = {
    "batch_first": {"batch_first": True},
    "seq_first": {"batch_first": False},
    "batch_first, key_padding_mask": {"batch_first": True, "padding": True},
    "seq_first, key_padding_mask, attn_mask": {"batch_first": False, "padding": True, "mask": True},
    "per-head weights": {"average": False},
    "no weights": {"need_weights": False},
    "bias_kv, zero_attn": {"add_bias_kv": True, "add_zero_attn": True, "padding": True},
}


@pytest.mark.parametrize("case", MHA_CASES.values(), ids=MHA_CASES.keys())
def test_multihead_attention_freeze_is_exact_and_separates(case):
    model = build(MHA, **case)
    res = run_checks(model)
    assert remainders(res) and max(remainders(res)) < 1e-13
    if case.get("need_weights", True):
        # The returned weights are an operating-point constant: wholly the bias component's.
        weights = res.components[1]
        expected = model(**tokens(0))[1]
        assert torch.all(weights[:-1] == 0)
        torch.testing.assert_close(weights[-1], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("case", MHA_CASES.values(), ids=MHA_CASES.keys())
def test_multihead_attention_secant_is_exact(case):
    res = run_checks(build(MHA, **case), Rules(softmax="secant"), separation=False)
    rule_remainder = res.operating_point.constants["mha"]["remainder"]
    assert rule_remainder.abs().max() < 1e-13
    if case.get("need_weights", True):
        assert res.components[1][:-1].abs().sum() > 0  # the weights are decomposed now


class CrossMHA(nn.Module):
    """Cross-attention with separate kdim/vdim projections and unbatched inputs."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 2, kdim=6, vdim=4)
        self.to_k, self.to_v = nn.Linear(E, 6), nn.Linear(E, 4)

    def forward(self, a, b, c):
        return self.mha(a[0] + b[0], self.to_k(b[0] + c[0]), self.to_v(c[0]))[0]


@pytest.mark.parametrize("softmax", ["freeze", "secant"])
def test_multihead_attention_kdim_vdim_unbatched(softmax):
    # Under freeze only the value path (lidar) reaches the output.
    run_checks(build(CrossMHA), Rules(softmax=softmax), separation=softmax == "freeze", moving=(2,))


# -- transformer blocks ----------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm, MHA, GELU MLP) on fused tokens + learned positions."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3 * N, E))
        self.block = PreNormBlock(E, 2, 2)

    def forward(self, a, b, c):
        return self.block(torch.cat([a, b, c], dim=1) + self.pos, self.pos)


def test_prenorm_block_is_exact_and_separates():
    res = run_checks(build(Block))
    # LayerNorm "ratio": every modality component is centred on its own mean (after the
    # affine weight is divided out), so it carries no share of the reference mean.
    norm = build(Block).block.norm1
    centred = res.layers["block.norm1"][:-1] / norm.weight
    assert centred.mean(-1).abs().max() < 1e-12


def test_prenorm_block_under_other_rules_is_exact():
    run_checks(build(Block), Rules(activation="tangent", norm="identity", bias_split="ratio", softmax="secant"),
               separation=False)


class Encoder(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.1, batch_first=True, **options)

    def forward(self, a, b, c):
        return self.layer(torch.cat([a, b, c], dim=1), src_key_padding_mask=torch.zeros(B, 3 * N, dtype=torch.bool))


class Decoder(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, 2, 16, dropout=0.1, batch_first=True, **options)

    def forward(self, a, b, c):
        causal = torch.ones(N, N, dtype=torch.bool).triu(1)
        return self.layer(a + b, torch.cat([b, c], dim=1), tgt_mask=causal)


LAYERS = {
    "encoder post-norm relu": (Encoder, {}),
    "encoder pre-norm gelu": (Encoder, {"norm_first": True, "activation": "gelu"}),
    "encoder nn.GELU": (Encoder, {"activation": nn.GELU()}),
    "decoder post-norm": (Decoder, {}),
    "decoder pre-norm": (Decoder, {"norm_first": True}),
}


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_transformer_layer_leaves_are_exact_and_separate(layer):
    cls, options = layer
    model = build(cls, **options)
    dec = lmdfx.compile(model, MODS)
    assert any(r.rule == "transformer_layer" for r in dec.report().rows)  # a leaf, not traced through
    res = run_checks(model)
    assert res.operating_point.constants["layer"]["remainder"].abs().max() < 1e-13
    run_checks(model, Rules(activation="tangent", bias_split="ratio", softmax="secant"), separation=False)


class Stack(nn.Module):
    def __init__(self, decoder: bool):
        super().__init__()
        self.decoder = decoder
        if decoder:
            layer = nn.TransformerDecoderLayer(E, 2, 16, dropout=0.1, batch_first=True, norm_first=True)
            self.stack = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(E))
        else:
            layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.1, batch_first=True)
            self.stack = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        padding = torch.zeros(B, 3 * N, dtype=torch.bool)
        padding[0, -3:] = True
        self.register_buffer("padding", padding)

    def forward(self, a, b, c):
        tokens = torch.cat([a, b, c], dim=1)
        if self.decoder:
            causal = nn.Transformer.generate_square_subsequent_mask(N, dtype=D)
            return self.stack(a + c, tokens, tgt_mask=causal, memory_key_padding_mask=self.padding)
        return self.stack(tokens, src_key_padding_mask=self.padding)


@pytest.mark.parametrize("decoder", [False, True], ids=["TransformerEncoder", "TransformerDecoder"])
def test_transformer_stacks_are_exact_and_separate(decoder):
    model = build(Stack, decoder)
    dec = lmdfx.compile(model, MODS)
    assert any(r.rule == "transformer_stack" for r in dec.report().rows)
    res = run_checks(model)
    assert res.operating_point.constants["stack"]["remainder"].abs().max() < 1e-13


def test_transformer_layer_sub_ops_take_overrides():
    # Submodules by qualified name (an nn.GELU activation is the submodule "layer.activation").
    model = build(Encoder, norm_first=True, activation=nn.GELU())
    rules = Rules(overrides={"layer.activation": "tangent", "layer.self_attn": "secant", "layer.norm2": "uniform"})
    dec = lmdfx.compile(model, MODS, rules=rules)
    sub = dec.module.get_submodule("lmd_rules.node_layer").sub
    names = {name: sub[name].name for name in ("activation", "self_attn", "norm1", "norm2")}
    assert names == {"activation": "tangent", "self_attn": "secant", "norm1": "ratio", "norm2": "uniform"}
    check_equality(dec, model, tokens(0))
    # A functional activation (F.gelu) is matched by its op.
    dec = lmdfx.compile(build(Encoder, activation="gelu"), MODS, rules=Rules(overrides={"gelu": "tangent"}))
    assert dec.module.get_submodule("lmd_rules.node_layer").sub["activation"].name == "tangent"


# -- learned tokens, positions, token concatenation --------------------------------------------


class QueryFusion(nn.Module):
    """Learned queries attend to concatenated modality tokens with positional embeddings."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(3, E))
        self.pos = nn.Parameter(torch.randn(1, 3 * N, E))

    def forward(self, a, b, c):
        t = torch.cat([a, b, c], dim=1) + self.pos
        q = self.query.expand(a.shape[0], -1, -1)
        return q + F.scaled_dot_product_attention(q, t, t)


def test_learned_tokens_and_positions_go_to_bias_and_concat_keeps_modalities_apart():
    model = build(QueryFusion)
    x = tokens(0)
    res = run_checks(model)
    concatenated = res.layers["add"]  # cat(...) + pos
    for i, p in enumerate(MODS.values()):
        own = torch.zeros(B, 3 * N, E, dtype=D)
        own[:, i * N:(i + 1) * N] = x[p]
        assert torch.equal(concatenated[i], own)
    assert torch.equal(concatenated[-1], model.pos.detach().expand(B, -1, -1))
    # output = query (bias) + P @ (tokens + pos): the positions reach the output via the bias only
    weights = res.operating_point.constants["scaled_dot_product_attention"]["weights"]
    expected_bias = model.query.detach() + weights @ model.pos.detach()
    torch.testing.assert_close(res.components[-1], expected_bias.expand(B, -1, -1), rtol=0, atol=1e-13)


# -- the Shapley product against the subset formula ------------------------------------------


def shapley_by_subsets(op, x: list[torch.Tensor], y: list[torch.Tensor]) -> list[torch.Tensor]:
    """Shapley values of the game v(S) = op(x_bias + Σ_S x_m, y_bias + Σ_S y_m); the bias gets v(∅)."""
    m = len(x) - 1
    players = range(m)

    def v(coalition) -> torch.Tensor:
        return op(x[-1] + sum((x[i] for i in coalition), torch.zeros_like(x[-1])),
                  y[-1] + sum((y[i] for i in coalition), torch.zeros_like(y[-1])))

    values = []
    for player in players:
        others = [p for p in players if p != player]
        total = torch.zeros_like(v(()))
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for coalition in itertools.combinations(others, size):
                total = total + weight * (v((*coalition, player)) - v(coalition))
        values.append(total)
    return [*values, v(())]


class Product(nn.Module):
    """x ⊙ y of two mixed values with known components: x_m = W_m a_m, bias = a parameter."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.x = nn.ModuleList(nn.Linear(E, E, bias=False) for _ in MODS)
        self.y = nn.ModuleList(nn.Linear(E, E, bias=False) for _ in MODS)
        self.x_bias, self.y_bias = nn.Parameter(torch.randn(N, E)), nn.Parameter(torch.randn(N, E))

    def parts(self, inputs):
        xs = [f(t) for f, t in zip(self.x, inputs)] + [self.x_bias.expand(B, N, E)]
        ys = [f(t) for f, t in zip(self.y, inputs)] + [self.y_bias.expand(B, N, E)]
        return xs, ys

    def forward(self, a, b, c):
        xs, ys = self.parts((a, b, c))
        return self.op(xs[0] + xs[1] + xs[2] + self.x_bias, ys[0] + ys[1] + ys[2] + self.y_bias)


PRODUCTS = {
    "mul": torch.mul,
    "matmul": lambda x, y: x @ y.transpose(-2, -1),
    "bmm": lambda x, y: torch.bmm(x, y.transpose(1, 2)),
    "einsum": lambda x, y: torch.einsum("bne,bme->bnm", x, y),
}


@pytest.mark.parametrize("op", PRODUCTS.values(), ids=PRODUCTS.keys())
def test_shapley_product_equals_the_subset_formula(op):
    model = build(Product, op)
    x = tokens(0)
    res = lmdfx.compile(model, MODS)(**x)
    with torch.no_grad():
        xs, ys = model.parts(tuple(x.values()))
    expected = shapley_by_subsets(op, xs, ys)
    for got, want in zip(res.components, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (res.components.sum(0) - res.output).abs().max() < RTOL * res.output.abs().max()


def test_freeze_product_freezes_the_bias_only_operand():
    # P @ v with P = frozen softmax (bias only): freezing P keeps v's components; freezing v
    # (the plain "second operand") would have moved all of the output to the bias.
    res = run_checks(build(FusedManualAttention), Rules(product="freeze"))
    shapley = lmdfx.compile(build(FusedManualAttention), MODS)(**tokens(0))
    torch.testing.assert_close(res.components, shapley.components, rtol=0, atol=1e-13)
    assert all(len(tensors(c)) for c in res.components)


class ExplicitAttention(nn.Module):
    """Single-head attention over the summed camera and radar tokens, written out."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(E, E, bias=False) for _ in range(3))

    def forward(self, a, b):
        x = a + b
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(E), -1)
        return weights @ self.v(x)


def test_frozen_softmax_weights_are_constants_and_the_scores_get_no_components():
    """softmax="freeze": P is an operating-point constant, so the camera component of P·V is
    P @ v(camera tokens) (a hand computation), and Q·Kᵀ is not decomposed at all."""
    model = ExplicitAttention().double().eval()
    a, b = tokens(0)["a"], tokens(0)["b"]
    dec = lmdfx.compile(model, {"camera": "a", "radar": "b"})
    res = dec(a, b)
    with torch.no_grad():
        weights = torch.softmax(model.q(a + b) @ model.k(a + b).transpose(-1, -2) / math.sqrt(E), -1)
        torch.testing.assert_close(res["camera"], weights @ model.v(a), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["radar"], weights @ model.v(b), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.components.sum(0), model(a, b), rtol=1e-12, atol=1e-12)
    rows = {row.op: row for row in dec.report().rows if row.op in ("softmax", "matmul")}
    assert rows["softmax"].kind == "frozen" and rows["softmax"].rule == "freeze"
    branched = {rule.call.op for rule in dec.module.lmd_rules.children()
                if any(n.target == f"lmd_rules.node_{rule.call.node}" for n in dec.module.graphs[0].graph.nodes)}
    assert "softmax" not in branched and "div" not in branched  # the scores and their scaling: no branch
