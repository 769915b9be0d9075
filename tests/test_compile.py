"""torch.compile on rewritten models.

* Graph breaks: the rewritten model has no more than the base model, with VACE off and on
  (MemFlow's VACE branch is hoisted above its bank pre-pass, a cache helper it does not need);
  the count does not grow with the number of blocks. (The VACE blocks run the model's own
  self-attention without a cache: called with no cache, it is traced through, so its Python
  decisions are guards checked outside dynamo, not breaks in a compiled graph.)
* Dispatch runs outside dynamo; each specialisation's generated function is compiled once,
  and repeated identical calls compile nothing.
* Compiled output equals eager output bit for bit with the eager backends.
* ``block.compile()`` before or after surgery: the compiled blocks are the ones that run.

Counted with ``torch._dynamo.explain`` (``graph_break_count``: compiled graphs minus one).
The four stand-ins besides LongLive repeat the VACE-on count and are marked slow.
"""
from __future__ import annotations

import functools
import logging
import operator
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

import surgery
from examples import PIPELINES
from examples.driver import call_diffs, example_call, run_stream, snapshot_caches
from examples.wan.pipeline import MODEL_SIZES
from rules import ffn_adapter, vace
from surgery.errors import GraftError, TraceError
from surgery.matching.pattern import FEED_FORWARD
from surgery.module import SurgeryState
from surgery.rewriting.outline import find_instances, outlined_graph, template_functions
from surgery.rewriting.specialise import compile_graph, specialise
from surgery.rule import Rule, Where
from surgery.tracing.policy import TracePolicy
from surgery.tracing.tracer import ExampleTracer
from surgery.tracing.twin import compiled_call, fake_inputs, fake_twin, new_fake_mode

pytestmark = pytest.mark.filterwarnings("ignore")
_SLOW = pytest.mark.slow  # 20-35 s each on 2 loaded cores


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Graph-break warnings name the model's own .item() calls; they are what is counted here.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rewritten(name: str, rule=None):
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, rule or vace.rule(), example_inputs=example_call(base, pipeline))
    return pipeline, result


def _context(pipeline, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 96, pipeline.config.num_frame_per_block, 4, 4, generator=g)


def _random_vace_weights(model: torch.nn.Module) -> None:
    """Non-zero VACE weights, so that VACE on changes every output."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("vace_"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def graph_breaks(model: torch.nn.Module, pipeline, vace_context=None) -> int:
    """``torch._dynamo.explain``'s graph breaks for one streaming denoising call (the first
    call under dynamo: a rewritten model specialises inside it, outside the traced region)."""
    args, kwargs = example_call(model, pipeline, vace_context=vace_context)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._dynamo.explain(model)(*args, **kwargs).graph_break_count


@pytest.mark.parametrize("name", list(PIPELINES))
def test_vace_off_breaks_the_graph_no_more_than_the_base_model(name):
    pipeline, result = _rewritten(name)
    base_breaks = graph_breaks(pipeline.build("tiny", seed=0), pipeline)
    assert graph_breaks(result.module, pipeline) <= base_breaks


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "longlive" else _SLOW) for n in PIPELINES])
def test_vace_on_breaks_the_graph_no_more_than_the_base_model(name):
    pipeline, result = _rewritten(name)
    base_breaks = graph_breaks(pipeline.build("tiny", seed=0), pipeline)
    assert graph_breaks(result.module, pipeline, _context(pipeline)) <= base_breaks


class _Feed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class _HelperFirst(nn.Module):
    """A cache helper right before the first block, handed the cache only (or the stream too)."""

    hands_stream = False
    writes_table = False

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([_Feed(), _Feed()])
        self.register_buffer("table", torch.linspace(0.5, 1.5, 4))

    def _refresh(self, cache: dict, x: torch.Tensor | None = None) -> None:
        cache["count"].add_(1)
        if x is not None:
            x.mul_(2)  # a helper may write what it is handed
        if self.writes_table:
            self.table.mul_(2)  # or its module's state

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        x = self.embed(x)
        self._refresh(cache, x if self.hands_stream else None)
        for block in self.blocks:
            x = x + block(x)
        return x


class _HelperWritesStream(_HelperFirst):
    hands_stream = True


class _HelperWritesTable(_HelperFirst):
    writes_table = True


def _hint(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * 0.5) * table


def _hint_rule():
    def keep_hint(site):
        site.scratch["hint"] = _hint(site.stream, site.model.table)

    def add_hint(site):
        return site.stream + site.scratch["hint"]

    return Rule(name="hint", options={}, pattern=FEED_FORWARD, expected=None, assign=lambda position, count: position,
                grafts=lambda context: {}, actions=((Where.BEFORE_FIRST, keep_hint), (Where.AFTER_EACH, add_hint)),
                inputs={}, check_call=lambda inputs, call, latent, model: {}, trace_policy=TracePolicy())


def _by_hand(model: _HelperFirst, x: torch.Tensor, cache: dict) -> torch.Tensor:
    """The rule's effect written out: the hint of the first block's input, added after each block."""
    x = model.embed(x)
    model._refresh(cache, x if model.hands_stream else None)
    hint = _hint(x, model.table)
    for block in model.blocks:
        x = x + (block(x) + hint)
    return x


@pytest.mark.parametrize("cls, hoisted", [(_HelperFirst, True), (_HelperWritesStream, False),
                                          (_HelperWritesTable, False)])
def test_rule_code_is_hoisted_above_a_cache_helper_only_when_the_helper_is_not_handed_what_it_reads(cls, hoisted):
    # Hoisted, the code before the first block joins the compiled graph before the helper's
    # break; handed the stream, the helper may write it in place, so the code stays after it
    # (as it does after a helper that writes a buffer the code reads).
    torch.manual_seed(0)
    by_hand = cls()  # (the helper writes its own model's state: one model for each side)
    torch.manual_seed(0)
    base = cls()
    x = torch.randn(2, 3, 4)
    result = surgery.apply(base, _hint_rule(), example_inputs=((x, {"count": torch.zeros(1)}), {}))
    nodes = list(result.graph.nodes)
    helper = next(i for i, node in enumerate(nodes) if node.meta.get("opaque_helper") == "_refresh")
    branch = [i for i, node in enumerate(nodes) if node.meta.get("surgery", {}).get("role") == "branch"]
    assert branch and all((i < helper) is hoisted for i in branch)
    ours, theirs = {"count": torch.zeros(1)}, {"count": torch.zeros(1)}
    with torch.no_grad():
        out = result.module(x, ours)
        assert torch.equal(out, _by_hand(by_hand, x, theirs)) and torch.equal(ours["count"], theirs["count"])
        assert torch.equal(result.module.table, by_hand.table)
        torch.manual_seed(0)
        assert not torch.equal(out, cls()(x, {"count": torch.zeros(1)}))  # the rule changes the output


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_compiled_double = torch.compile(_double, backend="eager")


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, kv_cache: dict | None = None, mask: Any = None) -> torch.Tensor:
        if kv_cache is not None:
            kv_cache["k"] = torch.cat([kv_cache["k"], x], dim=1)
            x = kv_cache["k"][:, -x.shape[1]:]
        return _compiled_double(self.proj(x))


class _Attentions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.copy = _Attention()  # (a grafted copy, run without caches)

    def forward(self, x: torch.Tensor, kv_cache: dict) -> torch.Tensor:
        return self.attn(x, kv_cache) + self.copy(x)


def _trace_attentions(policy: TracePolicy, model: nn.Module | None = None):
    mode = new_fake_mode()
    root = fake_twin(model or _Attentions(), mode)
    inputs = {"x": torch.zeros(1, 2, 4), "kv_cache": {"k": torch.zeros(1, 3, 4)}}
    trace = ExampleTracer(policy).trace_call(root, fake_inputs(inputs, mode), lambda root_proxy, proxies: type(
        root).forward(root, proxies["x"], proxies["kv_cache"]))
    return [(n.op, n.target) for n in trace.graph.nodes if n.op in ("call_module", "call_function")]


def test_a_module_called_without_its_caches_is_traced_through():
    # With its cache it is a stateful leaf; the copy's call hands it none: its cache-free path
    # is traced, so a compiled graph holds it (its decisions are guards, not graph breaks).
    calls = _trace_attentions(TracePolicy(cache_arguments=frozenset({"kv_cache"})))
    assert ("call_module", "attn") in calls and ("call_module", "copy.proj") in calls
    assert ("call_module", "copy") not in calls
    # A named argument no cache of the call goes by (as ``attention_mask`` keeps diffusers'
    # attention opaque) keeps its taker a leaf, with or without a value.
    calls = _trace_attentions(TracePolicy(cache_arguments=frozenset({"kv_cache", "mask"})))
    assert ("call_module", "attn") in calls and ("call_module", "copy") in calls


def test_a_compiled_function_is_one_call_of_the_compiled_function():
    # Its Python (flex attention's checks and higher-order op) is not model code; the node
    # calls the compiled function itself (fx would name torch's uncompiled one for flex attention).
    calls = _trace_attentions(TracePolicy(cache_arguments=frozenset({"kv_cache"})))
    compiled = [target for op, target in calls if op == "call_function" and target is compiled_call(_compiled_double)]
    assert len(compiled) == 1 and compiled[0].__name__ == "compiled__double"  # the copy's (attn is a leaf)
    assert not [target for op, target in calls if target is operator.mul]
    assert torch.equal(compiled[0](torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize("layers", [4, 10])
def test_no_tensor_work_between_block_calls(monkeypatch, layers):
    # Under torch.compile a block call whose code breaks the graph splits the generated forward
    # around it: tensor work between two block calls would be a compiled graph of its own for
    # every block. The injection after a block and a VACE block's output projection run
    # inside the blocks' functions instead, so the count does not grow with depth.
    monkeypatch.setitem(MODEL_SIZES["tiny"], "num_layers", layers)
    pipeline, result = _rewritten("longlive")
    model, state = result.module, result.module.surgery_state
    args, kwargs = example_call(model, pipeline, vace_context=_context(pipeline))
    inputs, positional = state.prepare(model, args, kwargs)
    spec, trace, _ = specialise(model, state.base_cls, state.rule, inputs, positional)
    groups = find_instances(spec.graph, trace.calls)
    functions = [fn for _, fn in template_functions(groups, compile_graph)]
    blocks = {fn for fn, members in zip(functions, groups)
              if re.fullmatch(r"(vace_)?blocks\.\d+", members[0].module_path)}
    nodes = list(outlined_graph(spec.graph, groups, functions).nodes)
    calls = [i for i, node in enumerate(nodes) if node.op == "call_function" and node.target in blocks]
    vace_blocks = layers // 2  # the first has its own code (before_proj); the others share a function
    assert len(calls) == layers + (vace_blocks - 1 if vace_blocks > 2 else 0)
    work = [node.format_node() for node in nodes[calls[0]:calls[-1]] if node.op != "get_attr"
            and not (node.op == "call_function" and (node.target in blocks or node.target is operator.getitem))]
    assert work == []
    # A block with the injection after it runs the other blocks' function, then the injection: the
    # block's code (which breaks the graph at its attention) is compiled once for every block.
    plain = {fn for fn, members in zip(functions, groups)
             if re.fullmatch(r"blocks\.\d+", members[0].module_path) and members[0].own == len(members[0].body)}
    injected = [fn for fn, members in zip(functions, groups)
                if re.fullmatch(r"blocks\.\d+", members[0].module_path) and members[0].own < len(members[0].body)]
    assert len(plain) == 1 and len(injected) == 1 and any(v in plain for v in injected[0].__globals__.values()
                                                          if callable(v))


@_SLOW
def test_graph_breaks_do_not_grow_with_the_number_of_blocks(monkeypatch):
    # (From three VACE blocks on, those after the first share one function: 6 and 10 blocks.)
    counts = {}
    for layers in (6, 10):
        monkeypatch.setitem(MODEL_SIZES["tiny"], "num_layers", layers)
        pipeline, result = _rewritten("longlive")
        counts[layers] = graph_breaks(result.module, pipeline, _context(pipeline))
    assert counts[10] == counts[6], counts


def test_dispatch_runs_outside_dynamo_and_each_graph_compiles_once():
    pipeline, result = _rewritten("longlive")
    model, state = result.module, result.module.surgery_state
    _random_vace_weights(model)
    compiled = torch.compile(model, backend="eager")
    contexts = [None, _context(pipeline)]

    def run(module, vace_context):
        args, kwargs = example_call(model, pipeline, vace_context=vace_context)
        with torch.no_grad():
            return module(*args, **kwargs), snapshot_caches(kwargs)

    for vace_context in contexts:  # the first compiled calls: each specialises, then compiles
        ours, caches = run(compiled, vace_context)
        theirs, eager_caches = run(model, vace_context)
        assert _equal(ours, theirs) and _equal(caches, eager_caches)  # the output and every cache after the call
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    built = state.built
    with torch._dynamo.config.patch(error_on_recompile=True):
        for vace_context in contexts * 2:  # identical calls, alternating between specialisations
            run(compiled, vace_context)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert state.built == built and state.last_dispatch[0] == "cached"
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list
    # One compiled entry for each generated function that ran (the graph of apply's example
    # call never did); none for the dispatcher.
    assert sorted(len(entries(spec.fn.__code__)) for spec in state.specialisations.values()) == [0, 1, 1]
    for bookkeeping in (SurgeryState.call, SurgeryState.dispatch, type(model).forward):
        assert entries(torch._dynamo.eval_frame.innermost_fn(bookkeeping).__code__) == []


def _equal(a, b) -> bool:
    """Bit-for-bit equality of nested outputs and caches."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_compiled_stream_equals_eager_bit_for_bit():
    pipeline, result = _rewritten("longlive")
    model = result.module
    _random_vace_weights(model)
    ctx = _context(pipeline)
    settings = dict(chunks=2, steps=(1000,), vace_context=ctx)  # denoising with VACE, commits without
    compiled = run_stream(torch.compile(model, backend="aot_eager"), pipeline, **settings)
    eager = run_stream(model, pipeline, **settings)
    assert max(call_diffs(compiled, eager)) == 0.0  # outputs and every cache after every call


class CountingBackend:
    """The eager backend, counting the graphs it compiles and their runs."""

    def __init__(self) -> None:
        self.compiled = 0
        self.runs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Any:
        self.compiled += 1

        def run(*args: Any) -> Any:
            self.runs += 1
            return graph_module.forward(*args)

        return run


#: Max abs diff allowed between inductor-compiled and eager runs on CPU in float32 (fused
#: kernels reorder reductions); measured 1.7e-6 over a 3-chunk stream, the base model's own 1.4e-6.
INDUCTOR_CPU_TOLERANCE = 2 ** -16


@_SLOW
def test_inductor_on_cpu_is_within_its_documented_tolerance():
    pipeline, result = _rewritten("longlive")
    model = result.module
    _random_vace_weights(model)
    settings = dict(chunks=1, steps=(1000,), vace_context=_context(pipeline))
    compiled = run_stream(torch.compile(model, backend="inductor"), pipeline, **settings)
    eager = run_stream(model, pipeline, **settings)
    assert 0.0 < max(call_diffs(compiled, eager)) <= INDUCTOR_CPU_TOLERANCE


def _entered(model: torch.nn.Module) -> list[int]:
    entered: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: entered.append(i))
    return entered


def test_blocks_compiled_after_surgery_are_the_blocks_that_run():
    pipeline, result = _rewritten("longlive")
    model, state = result.module, result.module.surgery_state
    _random_vace_weights(model)
    ctx = _context(pipeline)
    args, kwargs = example_call(model, pipeline, vace_context=ctx)
    with torch.no_grad():
        eager = model(*args, **kwargs)
    built = state.built
    backend = CountingBackend()
    for block in model.blocks:
        block.compile(backend=backend)
    entered = _entered(model)
    runs = []
    for _ in range(2):
        args, kwargs = example_call(model, pipeline, vace_context=ctx)
        with torch.no_grad():
            runs.append(model(*args, **kwargs))
    assert state.built == built + 1, state.reasons  # compiling them re-specialised once
    assert "compiled since its graph was built" in state.reasons[-1]
    compiled, ran = backend.compiled, backend.runs
    entered.clear()  # (the tracer ran the hooks too, on its fake twin)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        args, kwargs = example_call(model, pipeline, vace_context=ctx)
        runs.append(model(*args, **kwargs))
    assert entered == list(range(len(model.blocks)))  # called as modules, so their compiled call runs
    assert compiled > 0 and backend.compiled == compiled and backend.runs >= ran + len(model.blocks)
    assert all(torch.equal(run, eager) for run in runs)


def test_surgery_on_blocks_compiled_before_traces_their_own_forward():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    backend = CountingBackend()
    for block in base.blocks:
        block.compile(backend=backend)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    model = result.module
    for ours, theirs in zip(model.blocks, base.blocks):
        # Compiled again for the new model's block, with the same settings; the input's untouched.
        assert ours._compiled_call_impl._torchdynamo_orig_callable.__self__ is ours
        assert theirs._compiled_call_impl._torchdynamo_orig_callable.__self__ is theirs
    plain_pipeline, plain = _rewritten("longlive")
    for m in (model, plain.module):
        _random_vace_weights(m)
    entered = _entered(model)
    ctx = _context(pipeline)
    for vace_context in (ctx, None, ctx, None):
        args, kwargs = example_call(model, pipeline, vace_context=vace_context)
        plain_args, plain_kwargs = example_call(plain.module, pipeline, vace_context=vace_context)
        entered.clear()
        ran = backend.runs
        with torch.no_grad():
            assert torch.equal(model(*args, **kwargs), plain.module(*plain_args, **plain_kwargs))
        assert backend.runs >= ran + len(model.blocks)  # the blocks ran their compiled calls
    assert entered == list(range(len(model.blocks)))  # a cached graph: only the compiled blocks' calls
    assert backend.compiled > 0


def test_a_compiled_block_the_rule_changes_inside_is_refused_in_one_line():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    base.blocks[1].compile(backend="eager")
    with pytest.raises(TraceError) as error:
        surgery.apply(base, ffn_adapter.rule(), example_inputs=example_call(base, pipeline))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("blocks.1 is compiled (.compile()), but rule 'ffn-adapter' changes code inside it")
    assert "; fix: compile the whole rewritten model instead: torch.compile(result.module)" in message


def test_a_compiled_call_surgery_cannot_repeat_is_refused_in_one_line():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    foreign = functools.partial(base.blocks[0]._call_impl)  # compiled by something other than .compile()
    base.blocks[0].__dict__["_compiled_call_impl"] = foreign
    with pytest.raises(GraftError) as error:
        surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    assert str(error.value) == ("blocks.0 was compiled with .compile() in a way surgery cannot repeat on the new model; "
                                "fix: apply surgery to the uncompiled model, then call .compile() on result.module's "
                                "modules")
    assert base.blocks[0]._compiled_call_impl is foreign
