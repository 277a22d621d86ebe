"""Attention as the engine runs it (quantfx/passes/attention.py): nn.MultiheadAttention and
F.scaled_dot_product_attention in quantizable pieces, every projection weight and every tensor
TIDL holds quantized, signed MatMul inputs where the device has no signed x unsigned MatMul."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantfx as qf
from quantfx.layers import FakeQuantLayer
from quantfx.modules import AdditiveMask
from quantfx.passes.attention import AttentionPieces

FAST = {"bias_calibration": False, "progress": False, "widen_sensitive_layers": False}


class TokenAttention(nn.Module):
    """A conv stem into nn.MultiheadAttention, in any of its layouts."""

    def __init__(self, batch_first: bool = True, kdim: int | None = None,
                 need_weights: bool = False, average: bool = True,
                 unused_weights: bool = False) -> None:
        super().__init__()
        self.batch_first, self.need_weights, self.average = batch_first, need_weights, average
        self.unused_weights = unused_weights
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.keys = nn.Conv2d(3, kdim or 8, 3, padding=1)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim,
                                               vdim=kdim)

    def forward(self, images: torch.Tensor):
        order = (0, 2, 1) if self.batch_first else (2, 0, 1)
        query = self.conv(images).flatten(2).permute(*order)
        keys = self.keys(images).flatten(2).permute(*order)
        if self.unused_weights:  # the default need_weights=True, weights thrown away
            return self.attention(query, keys, keys)[0]
        output, weights = self.attention(query, keys, keys, need_weights=self.need_weights,
                                         average_attn_weights=self.average)
        return (output, weights) if self.need_weights else output


class UserAttention(nn.Module):
    """Attention as user code (timm's style) writes it: one qkv Linear, then
    F.scaled_dot_product_attention."""

    def __init__(self, width: int = 16, heads: int = 2, mask: str | None = None) -> None:
        super().__init__()
        self.heads, self.mask = heads, mask
        self.register_buffer("keep", torch.tensor([[True, False, True, True]] * 4))
        self.embed = nn.Conv2d(3, width, 2, stride=2)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2)
        batch, length, width = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.heads, width // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.mask == "causal":
            context = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        elif self.mask == "bool":  # True: takes part (SDPA's convention)
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=self.keep)
        else:
            context = F.scaled_dot_product_attention(query, key, value)
        return self.proj(context.transpose(1, 2).reshape(batch, length, width))


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple) else [value]


@pytest.mark.parametrize("layout", [
    {"batch_first": True},
    {"batch_first": True, "unused_weights": True},
    {"batch_first": False, "kdim": 6, "need_weights": True},
    {"batch_first": True, "need_weights": True, "average": False},
])
def test_pieces_compute_what_multihead_attention_computes(layout) -> None:
    """Before calibration the quantizers pass values through: the pieces (scale folded into the
    query projection, heads split and merged) must equal nn.MultiheadAttention's outputs."""
    torch.manual_seed(0)
    model = TokenAttention(**layout).eval()
    images = torch.randn(2, 3, 4, 4)
    prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(**FAST))
    assert not any(isinstance(module, nn.MultiheadAttention) for module in prepared.modules())
    assert all(node.users or node.op == "output" for node in prepared.graph.nodes
               if "attention" in node.name)  # no dead pieces (weights nobody reads)
    with torch.no_grad():
        for expected, got in zip(_outputs(model(images)), _outputs(prepared(images)),
                                 strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _float_weight_feeds(path) -> list[str]:
    """Names of MatMul/Gemm/Conv nodes that read a float initializer as weight."""
    model = onnx.load(str(path))
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type in ("MatMul", "Gemm", "Conv")
            and any(name in initializers for name in node.input[1:2])]


@pytest.mark.parametrize("model_class", [TokenAttention, UserAttention])
@pytest.mark.parametrize("target", ["am68a", "tda4vm"])
def test_every_projection_and_attention_tensor_is_quantized(tmp_path, model_class,
                                                            target) -> None:
    """Exported for a TIDL device: no float weight into a MatMul/Gemm, every tensor TIDL holds
    carries Q/DQ (the checker reports no float tensor), the file equals the converted model,
    and on TDA4VM no MatMul mixes a signed and an unsigned input."""
    torch.manual_seed(0)
    model = model_class().eval()
    images = torch.randn(8, 3, 4, 4)
    config = qf.QuantConfig(target=target, **FAST)
    prepared = qf.prepare(model, (images[:1],), config)
    weight_layers = [name for name, module in prepared.named_modules()
                     if isinstance(module, FakeQuantLayer)]
    if model_class is TokenAttention:
        assert {f"attention.{role}_proj" for role in ("q", "k", "v", "out")} <= set(weight_layers)
    qf.calibrate(prepared, [images])
    path = tmp_path / "attention.onnx"
    report = qf.export_onnx(qf.convert(prepared), (images[:2],), path)
    assert report.fraction_identical >= 0.99  # float softmax may flip a rounding elsewhere
    assert _float_weight_feeds(path) == []
    tidl = qf.check_tidl(path, target)
    assert tidl.fully_offloaded, str(tidl)
    assert not [finding for finding in tidl.findings if "without Q/DQ" in finding.rule]
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 2 and "Softmax" in ops


def test_tda4vm_probabilities_are_signed_and_am68a_unsigned() -> None:
    """Softmax output into the context MatMul: unsigned where the device multiplies signed by
    unsigned (a bit more precision), signed on TDA4VM, which cannot."""
    images = torch.randn(4, 3, 4, 4)
    signs = {}
    for target in ("am68a", "tda4vm"):
        torch.manual_seed(0)
        prepared = qf.prepare(TokenAttention().eval(), (images[:1],),
                              qf.QuantConfig(target=target, **FAST))
        signs[target] = prepared.get_submodule("quantizers.attention_probabilities").signed
    assert signs == {"am68a": False, "tda4vm": True}


class MaskedTokens(TokenAttention):
    """Self-attention over 16 tokens with a mask: a constant causal buffer (bool, or 0/-inf
    floats as nn.Transformer.generate_square_subsequent_mask makes), or a padding mask."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        causal = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
        self.register_buffer("mask", causal if kind == "bool" else
                             torch.zeros(16, 16).masked_fill(causal, float("-inf")))

    def forward(self, images):
        tokens = self.conv(images).flatten(2).transpose(1, 2)
        if self.kind == "padding":
            return self.attention(tokens, tokens, tokens,
                                  key_padding_mask=tokens[..., 0] < -0.5)[0]
        return self.attention(tokens, tokens, tokens, attn_mask=self.mask)[0]


def _float_until_calibrated_then_bit_exact(model, prepared, images, path) -> None:
    """The prepared model computes float until calibrated; converted, its file is bit-exact."""
    with torch.no_grad():
        assert torch.allclose(prepared(images), model(images), atol=1e-5)
    converted = qf.convert(qf.calibrate(prepared, [images]))
    report = qf.export_onnx(converted, (images[:1],), path, verify_data=[images[:4]])
    assert report.fraction_identical == 1.0


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_constant_attention_mask_is_decomposed(kind, tmp_path) -> None:
    """attn_mask as a buffer: the pieces apply it as an AdditiveMask, every projection is
    quantized, the float function is unchanged and the file is bit-exact."""
    torch.manual_seed(0)
    model, images = MaskedTokens(kind).eval(), torch.randn(16, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qf.QuantFxWarning)
        prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(**FAST))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in prepared.modules())
    masks = [m for m in prepared.modules() if isinstance(m, AdditiveMask)]
    assert len(masks) == 1 and torch.equal(masks[0].mask, torch.triu(torch.ones(16, 16), 1) > 0)
    _float_until_calibrated_then_bit_exact(model, prepared, images, tmp_path / "masked.onnx")


def test_a_padding_mask_stays_whole() -> None:
    """A key padding mask comes from the inputs: the module keeps running in float."""
    images = torch.randn(2, 3, 4, 4)
    with pytest.warns(qf.QuantFxWarning, match="MultiheadAttention"):
        prepared = qf.prepare(MaskedTokens("padding").eval(), (images[:1],),
                              qf.QuantConfig(**FAST))
    assert isinstance(prepared.get_submodule("attention"), nn.MultiheadAttention)


def test_qat_trains_the_projections() -> None:
    """prepare_qat: gradients reach each projection's weight (they are QAT layers, not
    constants), and attention dropout is active in training only."""
    torch.manual_seed(0)
    model = TokenAttention().eval()
    model.attention.dropout = 0.5
    images = torch.randn(4, 3, 4, 4)
    qat = qf.prepare_qat(model, (images[:1],), qf.QuantConfig(**FAST))
    qat.train()
    qat(images).square().mean().backward()
    for role in "qkv":
        assert qat.get_submodule(f"attention.{role}_proj.layer").weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(qat(images), qat(images))  # dropout on the probabilities
        qat.eval()
        assert torch.equal(qat(images), qat(images))


class EinsumAttention(nn.Module):
    """Attention written with einsum, as MaxViT writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.qkv = nn.Linear(8, 24)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2).unflatten(-1, (2, 4))
        query, key, value = self.qkv(tokens.flatten(-2)).unflatten(-1, (2, 3, 4)).unbind(-2)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        scores = torch.einsum("B H I D, B H J D -> B H I J", query, key).softmax(-1)
        return torch.einsum("bhij,bjhd->bhid", scores, value)


def test_einsum_matrix_products_become_matmul(tmp_path) -> None:
    """A two-operand einsum that is a batched matrix product exports as MatMul (TIDL has no
    Einsum); one that is not (here the second: its value operand is not in batch order)
    stays."""
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    images = torch.randn(4, 3, 4, 4)
    prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(**FAST))
    with torch.no_grad():
        torch.testing.assert_close(prepared(images), model(images), atol=1e-5, rtol=1e-5)
    qf.calibrate(prepared, [images])
    qf.export_onnx(qf.convert(prepared), (images[:2],), tmp_path / "einsum.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "einsum.onnx")).graph.node]
    assert ops.count("MatMul") == 1 and ops.count("Einsum") == 1


def _small_swin() -> nn.Module:
    """torchvision's Swin V1 on 16x16: 8x8 tokens, 4x4 windows, the second block shifted (so
    its shift mask is used)."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer([2, 2], 16, [2], [2], [4, 4], num_classes=5).eval()


def _small_swin_v2() -> nn.Module:
    """_small_swin with V2 blocks (cosine attention, per-head logit scale, MLP position bias)
    and a key bias in the weights, which torchvision ignores on each call."""
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    torch.manual_seed(0)
    model = SwinTransformer([2, 2], 16, [2], [2], [4, 4], num_classes=5,
                            block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("qkv.bias"):
                parameter.normal_()
    return model


def _export_decomposed_swin(model: nn.Module, images: torch.Tensor, path) -> qf.ExportReport:
    """Prepared (AM68A), the window attention is pieces that compute what torchvision does,
    the qkv and proj weights are quantized; calibrated, converted and exported, no float weight
    feeds a MatMul/Gemm/Conv."""
    prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(target="am68a", **FAST))
    assert "shifted_window_attention(" not in prepared.code
    with torch.no_grad():
        torch.testing.assert_close(prepared(images), model(images), atol=1e-5, rtol=1e-5)
    layers = [name for name, module in prepared.named_modules() if isinstance(
        module, FakeQuantLayer) and name.endswith(("qkv", "query", "key", "value", "proj"))]
    assert len(layers) == (8 if "logit_scale" in prepared.code else 4)
    qf.calibrate(prepared, [images])
    report = qf.export_onnx(qf.convert(prepared), (images[:2],), path)
    assert report.fraction_identical >= 0.99
    assert _float_weight_feeds(path) == []
    return report


@pytest.mark.parametrize("size", [16, 12])
def test_swin_window_attention_is_quantized(tmp_path, size) -> None:
    """Swin's shifted-window attention: the pieces compute what torchvision computes (the -100
    mask as -inf), the qkv and proj weights are quantized, every tensor carries Q/DQ and the
    file (the mask as an Add of -32768, saturated by the next Q/DQ) equals the model. At 12x12
    the 6x6 tokens pad to 8x8 windows: written as Concat with zeros (TIDL's Pad takes the last
    two axes only), still fully offloaded."""
    model = _small_swin()
    images = torch.randn(4, 3, size, size)
    path = tmp_path / "swin.onnx"
    _export_decomposed_swin(model, images, path)
    tidl = qf.check_tidl(path, "am68a")
    assert tidl.fully_offloaded, str(tidl)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Softmax") == 2


def test_swin_v2_cosine_attention_is_quantized_but_its_normalizations(tmp_path) -> None:
    """Swin V2 (cosine attention, per-head logit scale, no key bias, MLP position bias): the
    pieces compute what torchvision computes, padded windows included (12x12); query, key,
    value and proj weights are quantized and the only float steps left are the two L2
    normalizations."""
    images = torch.randn(4, 3, 12, 12)
    report = _export_decomposed_swin(_small_swin_v2(), images, tmp_path / "swin_v2.onnx")
    fallbacks = {finding.node for finding in report.tidl.findings}
    assert len(fallbacks) == 16 and all("unit_query." in node or "unit_key." in node
                                        for node in fallbacks)


def test_swin_v2_keys_stay_bias_free_through_bias_corrections() -> None:
    """Calibration's bias corrections gave V2's key a bias: a padded window's zero keys became
    unit vectors (F.normalize), and swin_v2_s at 64x64 fell to 0.5 dB. 16-bit activations,
    so that a key bias would survive the key's rounding."""
    model = _small_swin_v2()
    images = torch.randn(8, 3, 12, 12)
    prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(
        activation_bits=16, progress=False, widen_sensitive_layers=False))
    qf.calibrate(prepared, [images])
    keys = [module for name, module in prepared.named_modules()
            if isinstance(module, FakeQuantLayer) and name.endswith(".key")]
    assert len(keys) == 2 and all(key.layer.bias is None for key in keys)
    with torch.no_grad():
        reference, quantized = model(images), qf.convert(prepared)(images)
    sqnr = 10 * torch.log10(reference.pow(2).sum() / (reference - quantized).pow(2).sum())
    assert sqnr > 30, float(sqnr)


class CausalScores(nn.Module):
    """Attention written by hand, masked with masked_fill(-inf): a constant causal mask (a
    buffer), or a mask computed from the input (`dynamic`). Small scores: the mask's saturated
    value must still sit far below them."""

    def __init__(self, dynamic: bool = False, in_place: bool = False) -> None:
        super().__init__()
        self.dynamic, self.in_place = dynamic, in_place
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)
        self.register_buffer("causal", torch.triu(torch.ones(8, 8, dtype=torch.bool), 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv(tokens).chunk(3, dim=-1)
        scores = query @ key.transpose(-2, -1) / 4.0
        mask = scores < -0.1 if self.dynamic else self.causal
        if self.in_place:
            scores.masked_fill_(mask, float("-inf"))
        else:
            scores = scores.masked_fill(mask, float("-inf"))
        return self.out(torch.softmax(scores, dim=-1) @ value)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_constant_masked_fill_is_a_mask_the_engine_runs(tmp_path, in_place) -> None:
    """masked_fill(causal buffer, -inf) (or masked_fill_) becomes an AdditiveMask: no export
    warning, the file bit-exact, and the masked entries saturate far enough below the scores
    that the softmax ignores them (they leaked a tenth of each row, 10 dB, when the grid ended
    at -2)."""
    torch.manual_seed(0)
    model, tokens = CausalScores(in_place=in_place).eval(), torch.randn(64, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qf.QuantFxWarning)
        prepared = qf.prepare(model, (tokens[:1],), qf.QuantConfig(progress=False))
    masks = [m for m in prepared.modules() if isinstance(m, AdditiveMask)]
    assert len(masks) == 1 and torch.equal(masks[0].mask, model.causal)
    converted = qf.convert(qf.calibrate(prepared, [tokens]))
    with torch.no_grad():
        reference, output = model(tokens), converted(tokens)
    assert float(10 * torch.log10(reference.pow(2).sum() / (output - reference).pow(2).sum())) > 25
    report = qf.export_onnx(converted, (tokens[:1],), tmp_path / "causal.onnx",
                            verify_data=[tokens[:8]])
    assert report.fraction_identical == 1.0


def test_a_mask_computed_from_the_input_stays_masked_fill() -> None:
    with pytest.warns(qf.QuantFxWarning, match="masked_fill"):
        prepared = qf.prepare(CausalScores(dynamic=True).eval(), (torch.randn(1, 8, 16),),
                              qf.QuantConfig(progress=False))
    assert not any(isinstance(m, AdditiveMask) for m in prepared.modules())


@pytest.mark.parametrize("mask", ["causal", "bool"])
def test_sdpa_with_a_causal_or_constant_mask_is_decomposed(mask, tmp_path) -> None:
    """is_causal=True, or a constant bool attn_mask (True takes part): an AdditiveMask on the
    scaled scores, the float function unchanged, the file bit-exact."""
    torch.manual_seed(0)
    model, images = UserAttention(mask=mask).eval(), torch.randn(8, 3, 4, 4)
    prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(**FAST))
    masks = [m.mask for m in prepared.modules() if isinstance(m, AdditiveMask)]
    expected = (torch.ones(4, 4).tril() == 0) if mask == "causal" else ~model.keep
    assert len(masks) == 1 and torch.equal(masks[0], expected)
    _float_until_calibrated_then_bit_exact(model, prepared, images, tmp_path / "sdpa.onnx")


def test_attention_called_with_a_constant_and_a_computed_mask_stays_whole() -> None:
    """One module, two call sites: one decomposable, one not. Both stay whole (pieces at the
    module's path would be called with MultiheadAttention's arguments)."""

    class TwoCalls(MaskedTokens):
        def forward(self, images):
            tokens = self.conv(images).flatten(2).transpose(1, 2)
            first = self.attention(tokens, tokens, tokens, attn_mask=self.mask)[0]
            computed = first[0] @ first[0].transpose(0, 1)  # additive, from the input
            return self.attention(first, first, first, attn_mask=computed)[0]

    images = torch.randn(2, 3, 4, 4)
    with pytest.warns(qf.QuantFxWarning, match="MultiheadAttention"):
        prepared = qf.prepare(TwoCalls("bool").eval(), (images[:1],), qf.QuantConfig(**FAST))
    assert not any(isinstance(m, AttentionPieces) for m in prepared.modules())
