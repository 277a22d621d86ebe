"""nn.MultiheadAttention rewritten into the pieces an engine runs, so each can be quantized.

TIDL runs attention as Linear projections, MatMuls, a Softmax and Linear again, and stores
every tensor between them in 8 bit [T11.2]. Left whole, nn.MultiheadAttention would keep float
projection weights and float scores, probabilities and context. This pass replaces each call
(without a padding mask, a mask computed from the inputs, bias_k/bias_v or add_zero_attn,
which stay whole and float) by: one nn.Linear per projection (query, key, value: quantized
weights like any Linear; the 1/sqrt(head_dim) scale folded into the query projection),
`torch.matmul` for the scores, an `AdditiveMask` for a constant `attn_mask` (a causal mask
buffer), nn.Softmax, nn.Dropout on the probabilities (training only), `torch.matmul` for the
context and the output Linear.
`F.scaled_dot_product_attention` (as user code calls it after its own projections; causal, or
with a constant mask) becomes MatMul, a Mul by the scale, the mask, nn.Softmax and MatMul, and
a two-operand `torch.einsum` that is a batched matrix product (MaxViT's attention) becomes
`torch.matmul`.
Placement then quantizes each of those tensors; export writes them as Gemm/MatMul/Softmax.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from quantfx.modules import AdditiveMask
from quantfx.passes.graph_utils import (
    constant_value,
    inline_module,
    module_of,
    recorded_shape,
    set_submodule,
    unique_submodule_name,
)
from quantfx.passes.unshare import tied_copy
from quantfx.passes.window_attention import decompose_window_attention, linear_layer

FORWARD_PARAMETERS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]
"""query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, ..."""
UNSUPPORTED_CALL = {"key_padding_mask": None}
"""Call arguments attention is decomposed only with (a padding mask, computed from the inputs,
stays whole, in float). `attn_mask` may be a constant (L, S) mask: bool, or 0 / -inf floats."""


class AttentionPieces(nn.Module):
    """One nn.MultiheadAttention as projections, MatMuls and Softmax (traced through, never a
    leaf). `sequence_first`: the inputs are (L, N, E) (batch_first=False, batched)."""

    def __init__(self, attention: nn.MultiheadAttention, sequence_first: bool,
                 need_weights: bool, average_weights: bool, mask: Tensor | None = None) -> None:
        super().__init__()
        self.mask = None if mask is None else AdditiveMask(mask)
        embed, self.heads = attention.embed_dim, attention.num_heads
        scale = attention.head_dim ** -0.5
        if attention.in_proj_weight is not None:
            weights = attention.in_proj_weight.detach().split(embed)
        else:
            weights = tuple(getattr(attention, f"{role}_proj_weight").detach() for role in "qkv")
        biases = (attention.in_proj_bias.detach().split(embed)
                  if attention.in_proj_bias is not None else (None, None, None))
        self.q_proj = linear_layer(weights[0] * scale,
                                   None if biases[0] is None else biases[0] * scale)
        self.k_proj = linear_layer(weights[1], biases[1])
        self.v_proj = linear_layer(weights[2], biases[2])
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(attention.dropout)
        self.out_proj = linear_layer(attention.out_proj.weight.detach(),
                                None if attention.out_proj.bias is None
                                else attention.out_proj.bias.detach())
        self.sequence_first = sequence_first
        self.need_weights = need_weights
        self.average_weights = average_weights

    def _split_heads(self, projected: Tensor) -> Tensor:
        """(..., L, E) -> (..., heads, L, head_dim)."""
        return projected.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.sequence_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        scores = torch.matmul(self._split_heads(self.q_proj(query)),
                              self._split_heads(self.k_proj(key)).transpose(-2, -1))
        if self.mask is not None:
            scores = self.mask(scores)
        probabilities = self.softmax(scores)
        context = torch.matmul(self.dropout(probabilities), self._split_heads(self.v_proj(value)))
        output = self.out_proj(context.transpose(-3, -2).flatten(-2))
        if self.sequence_first:
            output = output.transpose(0, 1)
        if not self.need_weights:
            return output, None
        return output, probabilities.mean(dim=-3) if self.average_weights else probabilities


def _call_arguments(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    signature = inspect.signature(nn.MultiheadAttention.forward)
    bound = signature.bind(None, *node.args, **node.kwargs)
    bound.apply_defaults()
    return {name: bound.arguments[name] for name in FORWARD_PARAMETERS}


def constant_attention_mask(graph_module: fx.GraphModule, mask: Any) -> Tensor | None:
    """A call's `attn_mask` as a bool (L, S) mask (True: masked) when it is a constant of the
    model, bool or 0 / -inf floats; None when there is none. `LookupError` for any other mask
    (computed from the inputs, per batch and head, or additive with other values)."""
    if mask is None:
        return None
    value = constant_value(graph_module, mask)
    if not isinstance(value, Tensor) or value.dim() != 2:
        raise LookupError("not a constant (L, S) mask")
    if value.dtype == torch.bool:
        return value.detach().clone()
    if value.is_floating_point() and bool(((value == 0) | torch.isneginf(value)).all()):
        return torch.isneginf(value.detach())
    raise LookupError("an additive mask with values other than 0 and -inf")


def _mask_of(graph_module: fx.GraphModule, arguments: dict[str, Any]) -> Tensor | None | bool:
    """The call's constant mask, None without one, False when it cannot be decomposed."""
    try:
        return constant_attention_mask(graph_module, arguments["attn_mask"])
    except LookupError:
        return False


def _decomposable(attention: nn.Module, node: fx.Node, arguments: dict[str, Any]) -> bool:
    if type(attention).forward is not nn.MultiheadAttention.forward:
        return False  # a subclass that computes something else
    if attention.bias_k is not None or attention.add_zero_attn:
        return False
    if any(arguments[name] is not default for name, default in UNSUPPORTED_CALL.items()):
        return False
    if not all(isinstance(arguments[name], bool) for name in ("need_weights",
                                                              "average_attn_weights")):
        return False
    return all(user.op == "call_function" and user.target is operator.getitem
               and user.args[1] in (0, 1) for user in node.users) and (
        arguments["need_weights"] or not _weights_read(node))


def _weights_read(node: fx.Node) -> bool:
    """Whether anything reads the call's attention weights (its output 1)."""
    return any(user.args[1] == 1 and user.users for user in node.users)


def _same_mask(pieces: AttentionPieces, mask: Tensor | None) -> bool:
    if pieces.mask is None or mask is None:
        return pieces.mask is None and mask is None
    return pieces.mask.mask.shape == mask.shape and bool(torch.equal(pieces.mask.mask, mask))


def _pieces_for(graph_module: fx.GraphModule, node: fx.Node, attention: nn.MultiheadAttention,
                options: tuple[bool, bool, bool], mask: Tensor | None,
                first: dict[str, AttentionPieces]) -> str:
    """The path of the pieces for this call: the module's first pieces (registered at its own
    path), or a copy tied to them when this call asks for other outputs or another mask."""
    pieces = first.get(node.target)
    if pieces is None:
        first[node.target] = AttentionPieces(attention, *options, mask)
        set_submodule(graph_module, node.target, first[node.target])
        return node.target
    if ((pieces.sequence_first, pieces.need_weights, pieces.average_weights) == options
            and _same_mask(pieces, mask)):
        return node.target
    variant = tied_copy(pieces)
    variant.sequence_first, variant.need_weights, variant.average_weights = options
    variant.mask = None if mask is None else AdditiveMask(mask)
    target = unique_submodule_name(graph_module, node.target)
    graph_module.add_submodule(target, variant)
    return target


SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                 "enable_gqa": False}
"""F.scaled_dot_product_attention's optional arguments, in order after query, key, value."""
INNER_NAMES = {"matmul": "scores", "softmax": "probabilities", "matmul_1": "context"}
"""Names of the pieces' tensors in the model's graph (and the ONNX file)."""


def _sdpa_mask(graph_module: fx.GraphModule, options: dict[str, Any], query: Any,
               key: Any) -> Tensor | None | bool:
    """The masked (True) pairs of an SDPA call: causal, or its constant `attn_mask` (bool:
    True takes part, unlike nn.MultiheadAttention's; float: 0 / -inf); None without a mask,
    False for a mask that is not a constant (L, S) one."""
    if options["is_causal"]:
        shape_q, shape_k = recorded_shape(query), recorded_shape(key)
        if options["attn_mask"] is not None or shape_k is None:
            return False
        device = next(iter(graph_module.parameters()), torch.empty(0)).device  # the model's
        return torch.ones(shape_q[-2], shape_k[-2], dtype=torch.bool,
                          device=device).tril().logical_not()
    try:
        value = constant_value(graph_module, options["attn_mask"])
        if isinstance(value, Tensor) and value.dtype == torch.bool:
            value = value.logical_not()  # SDPA: True takes part
        return constant_attention_mask(graph_module, value)
    except LookupError:
        return False


def _decompose_sdpa(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """`F.scaled_dot_product_attention(q, k, v)` as MatMul, Mul by the scale, a mask (causal
    or constant, as `AdditiveMask`), nn.Softmax and MatMul; False (left whole) when it has a
    mask computed from the inputs, dropout or grouped query heads."""
    arguments = dict(zip(("query", "key", "value", *SDPA_DEFAULTS), node.args))
    arguments.update(node.kwargs)
    options = {name: arguments.get(name, default) for name, default in SDPA_DEFAULTS.items()}
    if (options["enable_gqa"] or options["dropout_p"] != 0.0
            or recorded_shape(arguments.get("query")) is None):
        return False
    query, key, value = (arguments[name] for name in ("query", "key", "value"))
    mask = _sdpa_mask(graph_module, options, query, key)
    if mask is False:
        return False
    head_dim = recorded_shape(query)[-1]
    scale = options["scale"] if options["scale"] is not None else head_dim ** -0.5
    softmax = unique_submodule_name(graph_module, f"{node.name}_probabilities")
    graph_module.add_submodule(softmax, nn.Softmax(dim=-1))
    graph = graph_module.graph

    def add(op: str, target: Any, args: tuple, name: str) -> fx.Node:
        return graph.create_node(op, target, args, name=f"{node.name}_{name}")

    with graph.inserting_before(node):
        transposed = add("call_method", "transpose", (key, -2, -1), "key_transposed")
        scores = add("call_function", torch.matmul, (query, transposed), "scores")
        scaled = add("call_function", operator.mul, (scores, float(scale)), "scaled_scores")
        if mask is not None:
            masker = unique_submodule_name(graph_module, f"{node.name}_mask")
            graph_module.add_submodule(masker, AdditiveMask(mask))
            scaled = add("call_module", masker, (scaled,), "masked_scores")
        probabilities = add("call_module", softmax, (scaled,), "probabilities")
        context = add("call_function", torch.matmul, (probabilities, value), "context")
    node.replace_all_uses_with(context)
    graph.erase_node(node)
    return True


def _matmul_form(equation: str) -> bool | None:
    """For a two-operand einsum that is a batched matrix product: whether the second operand is
    transposed ('...ik,...jk->...ij': True; '...ik,...kj->...ij': False); None otherwise."""
    equation = equation.replace(" ", "")
    if equation.count(",") != 1 or "->" not in equation or "." in equation:
        return None
    operands, output = equation.split("->")
    first, second = operands.split(",")
    if len(first) < 2 or not (len(first) == len(second) == len(output)):
        return None
    batch, (row, inner) = first[:-2], first[-2:]
    column = output[-1]
    if output != batch + row + column or len({*batch, row, inner, column}) != len(first) + 1:
        return None
    if second == batch + column + inner:
        return True
    return False if second == batch + inner + column else None


def _einsum_as_matmul(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """`torch.einsum("bhid,bhjd->bhij", q, k)` (any letters, any batch dims) as torch.matmul,
    the second operand transposed where the equation says: TIDL runs MatMul, not Einsum."""
    if not node.args or not isinstance(node.args[0], str):
        return False
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    transposed = _matmul_form(node.args[0])
    if transposed is None or len(operands) != 2 or not all(
            recorded_shape(operand) is not None for operand in operands):
        return False
    graph = graph_module.graph
    left, right = operands
    with graph.inserting_before(node):
        if transposed:
            right = graph.create_node("call_method", "transpose", (right, -2, -1),
                                      name=f"{node.name}_transposed")
        product = graph.create_node("call_function", torch.matmul, (left, right),
                                    name=f"{node.name}_matmul")
    node.replace_all_uses_with(product)
    graph.erase_node(node)
    return True


def decompose_attention(graph_module: fx.GraphModule) -> int:
    """Replace every decomposable nn.MultiheadAttention and F.scaled_dot_product_attention
    call (see the module text) by its pieces; returns how many calls were replaced. A module
    called at several sites keeps one set of weights (unsharing ties its sites' copies)."""
    replaced = decompose_window_attention(graph_module)
    calls = [node for node in graph_module.graph.nodes if node.op == "call_function"]
    replaced += sum(_decompose_sdpa(graph_module, node) for node in calls
                   if node.target is F.scaled_dot_product_attention)
    replaced += sum(_einsum_as_matmul(graph_module, node) for node in calls
                    if node.target is torch.einsum)
    modules = [(node, module_of(graph_module, node)) for node in graph_module.graph.nodes
               if isinstance(module_of(graph_module, node), nn.MultiheadAttention)]
    arguments_of = {node: _call_arguments(node) for node, _ in modules}
    masks = {node: _mask_of(graph_module, arguments_of[node]) for node, _ in modules}
    whole = {node.target for node, attention in modules  # one call site whole: all stay whole
             if masks[node] is False or not _decomposable(attention, node, arguments_of[node])}
    first: dict[str, AttentionPieces] = {}
    for node, attention in modules:
        if node.target in whole:
            continue
        arguments, mask = arguments_of[node], masks[node]
        shape = recorded_shape(arguments["query"])
        options = (not attention.batch_first and shape is not None and len(shape) == 3,
                   arguments["need_weights"] and _weights_read(node),  # unread: not computed
                   arguments["average_attn_weights"])
        target = _pieces_for(graph_module, node, attention, options, mask, first)
        outputs = inline_module(graph_module, node, graph_module.get_submodule(target), target,
                               tuple(arguments[name] for name in ("query", "key", "value")),
                               INNER_NAMES)
        for user in list(node.users):
            replacement = outputs[user.args[1]]
            if replacement is not None:
                user.replace_all_uses_with(replacement)
            graph_module.graph.erase_node(user)
        graph_module.graph.erase_node(node)
        replaced += 1
    if replaced:
        graph_module.graph.lint()
        graph_module.recompile()
    return replaced
