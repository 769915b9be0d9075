"""Structural patterns over traced module calls.

A pattern is an ordered list of named checks. Each check looks at one traced call (its
nodes, its stream input and output) and either passes or says why it failed, so a
non-match can be explained by the first check that failed. Class names are never read.

Two kinds of check exist. A *contains* check (``feed_forward``, ``self_attention``) passes
when the structure occurs anywhere inside the call, so a block and the whole model both
contain an FFN. An *is* check (``is_feed_forward``) passes only when the call's own
dataflow from its input to its output is that structure, so only the FFN call itself passes.
A pattern also says how its matches are selected (:attr:`Pattern.select`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import RuleError
from ..tracing.tracer import ConcreteProxy, ModuleCall

_ADDS = {operator.add, operator.iadd, torch.add}
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Mish)
_ACTIVATION_FUNCTIONS = ("gelu", "silu", "relu")
# Value-preserving steps a residual stream or an FFN may pass through: dtype and layout
# casts (diffusers computes a block's residual adds in float32 and ends with
# ``.type_as(x)``), and layers that are the identity in inference (``Dropout``).
_CASTS = frozenset({"type_as", "to", "float", "double", "half", "bfloat16", "contiguous"})
_PASS_THROUGH = (nn.Dropout, nn.Identity)


@dataclass
class CallView:
    """What the checks see of one traced module call."""

    call: ModuleCall
    root: nn.Module
    nodes: list[fx.Node]
    stream_in: fx.Node | None
    stream_out: fx.Node | None

    @property
    def qualname(self) -> str:
        return self.call.qualname

    def module_of(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls, seen through adapter wrappers.

        A LoRA layer wraps the layer it adapts (``base_layer``); structurally it still is
        that layer, so a block with LoRA on its FFN must still match.
        """
        if node.op != "call_module":
            return None
        module = self.root.get_submodule(node.target)
        while isinstance(getattr(module, "base_layer", None), nn.Module):
            module = module.base_layer
        return module

    def producer(self, node: fx.Node | None) -> fx.Node | None:
        """The node ``node``'s value comes from, looking back through inference-time
        identities (``Dropout``, ``Identity``) and dtype or layout casts."""
        while node is not None and node.args and isinstance(node.args[0], fx.Node) \
                and (_is_cast(node) or isinstance(self.module_of(node), _PASS_THROUGH)):
            node = node.args[0]
        return node

    def derived_from_stream(self) -> set[fx.Node]:
        """Nodes of this call that depend on the stream input."""
        reached: set[fx.Node] = {self.stream_in} if self.stream_in is not None else set()
        for node in self.nodes:
            if any(a in reached for a in node.all_input_nodes):
                reached.add(node)
        return reached


def view_of(call: ModuleCall, root: nn.Module) -> CallView:
    nodes = list(call.nodes)
    stream_in = call.args[0].node if call.args and isinstance(call.args[0], ConcreteProxy) else None
    out = call.output
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    stream_out = out.node if isinstance(out, ConcreteProxy) else None
    return CallView(call, root, nodes, stream_in, stream_out)


def _example(node: fx.Node | None) -> object:
    return None if node is None else node.meta.get("example_value")


# A check returns None on success or a short reason on failure.
Check = Callable[[CallView], "str | None"]


def residual_stream(view: CallView) -> str | None:
    x, y = _example(view.stream_in), _example(view.stream_out)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        return "first argument is not a [batch, tokens, dim] tensor"
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return f"no output with the input's shape {tuple(x.shape)}"
    return None


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _CASTS and bool(node.args) and isinstance(node.args[0], fx.Node)


def residual_adds(view: CallView, minimum: int = 2) -> str | None:
    count, node = 0, view.stream_out
    while node is not None and node is not view.stream_in:
        if _is_cast(node):
            node = node.args[0]
        elif node.op == "call_function" and node.target in _ADDS and node.args:
            count += 1
            node = node.args[0] if isinstance(node.args[0], fx.Node) else None
        else:
            return f"output is not reached from the input through residual adds (stopped at `{node.name}`)"
    if node is None:
        return "output is not reached from the input through residual adds"
    if count < minimum:
        return f"only {count} residual add(s), expected at least {minimum}"
    return None


def _opaque_calls(view: CallView) -> Iterable[fx.Node]:
    for node in view.nodes:
        module = view.module_of(node)
        if module is not None and not type(module).__module__.startswith("torch.nn"):
            yield node


def _external_sequence(view: CallView, node: fx.Node, dim: int, stream: set[fx.Node]) -> bool:
    inside = set(view.nodes)
    for arg in node.all_input_nodes:
        value = _example(arg)
        if arg in stream or arg in inside:
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[-1] == dim \
                and value.is_floating_point():
            return True
    return False


def self_attention_calls(view: CallView) -> list[fx.Node]:
    """The opaque module calls of ``view`` that read the block's tokens and no external sequence."""
    stream = view.derived_from_stream()
    dim = _example(view.stream_in).shape[-1]
    return [node for node in _opaque_calls(view)
            if node.args and node.args[0] in stream and not _external_sequence(view, node, dim, stream)]


def self_attention(view: CallView) -> str | None:
    return None if self_attention_calls(view) else "no attention call that reads only the block's own tokens"


def cross_attention(view: CallView) -> str | None:
    stream = view.derived_from_stream()
    dim = _example(view.stream_in).shape[-1]
    for node in _opaque_calls(view):
        if node.args and node.args[0] in stream and _external_sequence(view, node, dim, stream):
            return None
    return "no attention call that reads the block's tokens and an external [batch, tokens, dim] context"


def _is_activation(view: CallView, node: fx.Node | None) -> bool:
    return node is not None and (isinstance(view.module_of(node), _ACTIVATIONS) or (
        node.op == "call_function" and getattr(node.target, "__name__", "") in _ACTIVATION_FUNCTIONS))


def _inverse_linears(first: nn.Module | None, second: nn.Module | None) -> bool:
    """Two Linears that map ``dim -> hidden -> dim``."""
    return isinstance(first, nn.Linear) and isinstance(second, nn.Linear) \
        and second.in_features == first.out_features and second.out_features == first.in_features


def feed_forward(view: CallView) -> str | None:
    """*Contains*: a ``Linear -> activation -> Linear`` somewhere on the call's stream."""
    stream = view.derived_from_stream()
    for node in view.nodes:
        if not isinstance(view.module_of(node), nn.Linear) or node not in stream:
            continue
        for act in node.users:
            if not _is_activation(view, act):
                continue
            for second_node in _past_identities(view, act):
                if _inverse_linears(view.module_of(node), view.module_of(second_node)):
                    return None
    return "no Linear -> activation -> Linear feed-forward on the block's tokens"


def shape_preserving(view: CallView) -> str | None:
    """The call takes a floating-point tensor first and returns a tensor of the same shape."""
    x, y = _example(view.stream_in), _example(view.stream_out)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return "first argument is not a floating-point tensor"
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return f"no output with the input's shape {tuple(x.shape)}"
    return None


def _first_input(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def is_feed_forward(view: CallView) -> str | None:
    """*Is*: the call computes exactly ``Linear -> activation -> Linear`` from its input to
    its output (inference-time identities and casts aside).

    The path is followed back from the output, so a block that merely contains an FFN (its
    output is a residual add) fails, and so does the model holding the blocks.
    """
    inside = set(view.nodes)
    second = view.producer(view.stream_out)
    if second not in inside or not isinstance(view.module_of(second), nn.Linear):
        return "the output is not computed by a Linear of this call"
    act = view.producer(_first_input(second))
    if act not in inside or not _is_activation(view, act):
        return "the output Linear does not read an activation"
    first = view.producer(_first_input(act))
    if first not in inside or not isinstance(view.module_of(first), nn.Linear):
        return "the activation does not read a Linear"
    if view.producer(_first_input(first)) is not view.stream_in:
        return "the first Linear does not read the call's input"
    if not _inverse_linears(view.module_of(first), view.module_of(second)):
        return "the two Linears do not map dim -> hidden -> dim"
    return None


def _past_identities(view: CallView, node: fx.Node) -> Iterable[fx.Node]:
    """The users of ``node``, looking through inference-time identities (``Dropout``)."""
    for user in node.users:
        if isinstance(view.module_of(user), _PASS_THROUGH):
            yield from _past_identities(view, user)
        else:
            yield user


#: How a pattern's matches are selected (see :class:`Pattern`).
SELECTIONS = ("all", "chain")


@dataclass(frozen=True)
class Pattern:
    """A named structural pattern: an ordered list of (name, check) pairs.

    ``select`` says which of the calls that pass every check are the matches:

    * ``"all"`` (default): every such call, at any depth, in execution order (every FFN
      inside every block). Two matches of which one runs inside the other are an error:
      the checks then say "contains" where they should say "is" (see the module docstring).
    * ``"chain"``: the units of one residual chain: the calls at the outermost depth that
      matches, then the longest run in which each call's output is the next one's input
      (the blocks of a transformer).
    """

    name: str
    checks: tuple[tuple[str, Check], ...]
    select: str = "all"

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise RuleError(f"pattern '{self.name}' has select={self.select!r}",
                            f"use one of {', '.join(map(repr, SELECTIONS))}")

    def evaluate(self, view: CallView) -> tuple[int, str | None, str | None]:
        """(checks passed, first failing check, its reason)."""
        for passed, (name, check) in enumerate(self.checks):
            reason = check(view)
            if reason is not None:
                return passed, name, reason
        return len(self.checks), None, None


ATTENTION_BLOCK = Pattern(
    "attention block",
    (
        ("residual stream", residual_stream),
        ("residual adds", residual_adds),
        ("self-attention", self_attention),
        ("cross-attention", cross_attention),
        ("feed-forward", feed_forward),
    ),
    select="chain",
)
"""A residual unit holding self-attention, cross-attention and an FFN (a transformer block)."""

FEED_FORWARD = Pattern(
    "feed-forward unit",
    (
        ("tensor in and out", shape_preserving),
        ("is Linear -> activation -> Linear", is_feed_forward),
    ),
)
"""The call of a feed-forward module itself (``nn.Sequential(Linear, GELU, Linear)``, a
diffusers ``FeedForward``): every one at any depth, one per block."""
