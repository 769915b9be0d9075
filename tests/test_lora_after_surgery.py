"""LoRA after surgery: Base -> VACE (weights from safetensors) -> LoRA on the rewritten graph.

Every pipeline is checked bit for bit (``compare(...) == 0.0`` over 3 streaming chunks,
outputs and cache snapshots) against the same operation on the hand-written reference,
with identical non-zero VACE weights and identical seeded LoRA weights. The two models
name their modules differently (``blocks.0.self_attn.q`` against the reference's
``causal_wan_model.blocks.0.self_attn.q``), so LoRA targets and values are always given
by *native* name and mapped through the reference's key map.

PEFT changes the module tree after surgery. The rewritten model's graphs resolve module
paths at call time, so the LoRA layers are picked up by graphs traced before the
injection; specialisations traced after it (the stream's later passes, a cleared cache)
must see through the LoRA wrappers when they match the blocks again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from examples import PIPELINES
from examples.driver import StreamRecord, compare, example_call, run_stream
from examples.reference import (
    CausalVaceWanModel,
    load_vace_state_dict,
    random_vace_state_dict,
    to_native_key,
    to_reference_key,
)
from rules import vace
from rules.vace import load_vace_weights
from surgery.errors import OrderError
from surgery.lora import check_order, load_lora_file, module_targeted_targets
from surgery.lora.uncalled import uncalled_linear, uncalled_targets
from surgery.reports.report import build_report, render_markdown

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

NAMES = list(PIPELINES)
RES_A = (32, 32)  # the resolution surgery traced at
RES_B = (48, 80)  # a new resolution: fresh specialisations, traced with the LoRA layers in place
CHUNKS = 3

# runtime_peft's form: exact module paths (PEFT matches them as names or dotted suffixes).
EXACT = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.2.cross_attn.o", "blocks.3.self_attn.o", "blocks.0.ffn.2"]
# A string target is full-matched against module names: here main and VACE blocks at once.
REGEX = r"(vace_)?blocks\.\d+\.(self_attn\.v|cross_attn\.q|ffn\.2)|vace_blocks\.\d+\.after_proj"


# --------------------------------------------------------------------------- the pair under test
@dataclass
class Pair:
    """The rewritten model and the reference with identical (non-zero) VACE weights."""

    pipeline: object
    result: surgery.ApplyResult
    model: nn.Module
    reference: CausalVaceWanModel
    keys: list[str]  # state_dict keys of the rewritten model before any LoRA

    def stream(self, model: nn.Module, resolution: tuple[int, int] = RES_A) -> StreamRecord:
        return run_stream(model, self.pipeline, chunks=CHUNKS, height=resolution[0], width=resolution[1],
                          vace_context=vace_context(self.pipeline, resolution))

    def streams(self, resolution: tuple[int, int] = RES_A) -> tuple[StreamRecord, StreamRecord]:
        return self.stream(self.model, resolution), self.stream(self.reference, resolution)

    def one_call(self, model: nn.Module) -> torch.Tensor:
        """One first-step denoising call with VACE (fresh caches): a cheap "did LoRA change it" probe."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # setup writes go inside
        args, kwargs = example_call(inner, self.pipeline, vace_context=vace_context(self.pipeline, RES_A))
        with torch.no_grad():
            return model(*args, **kwargs)


def vace_context(pipeline, resolution: tuple[int, int]) -> torch.Tensor:
    height, width = resolution
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 96, pipeline.config.num_frame_per_block, height // 8, width // 8, generator=g)


def make_pair(name: str, tmp_path: Path) -> Pair:
    """Base -> VACE: surgery, then the same VACE safetensors file into both models."""
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=RES_A[0],
                                                                         width=RES_A[1]))
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=0))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "vace.safetensors"
    save_file(random_vace_state_dict(reference, seed=3), str(path))
    load_vace_weights(result.module, path)
    load_vace_state_dict(reference, load_file(str(path)))
    return Pair(pipeline, result, result.module, reference, list(result.module.state_dict()))


def ref_name(native: str) -> str:
    """The reference's module name for a native module name (``blocks.N`` -> ``causal_wan_model.blocks.N``)."""
    return to_reference_key(native)


def lora_values(model: nn.Module, targets: list[str], *, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Seeded non-zero (A, B) per native target; shapes from the rewritten model's Linears."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for target in sorted(targets):
        layer = model.get_submodule(target)
        linear = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
        a = torch.randn(rank, linear.in_features, generator=g) / math.sqrt(linear.in_features)
        b = torch.randn(linear.out_features, rank, generator=g) / math.sqrt(rank)
        out[target] = (a, b)
    return out


def set_lora(model: nn.Module, values: dict[str, tuple[torch.Tensor, ...]], adapter: str, *,
             reference: bool = False) -> None:
    """Copy A/B into the adapter's layers by native name (mapped for the reference)."""
    with torch.no_grad():
        for native, (a, b) in values.items():
            layer = model.get_submodule(ref_name(native) if reference else native)
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)


def lora_targets(model: nn.Module, adapter: str, *, reference: bool = False) -> set[str]:
    """Native names of the layers that carry ``adapter``."""
    names = {n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
    return {to_native_key(n) for n in names} if reference else names


def lora_config(targets, rank: int = 4, alpha: float = 8.0) -> LoraConfig:
    # init_lora_weights=False: B is not zero-initialised; the tests copy their own values anyway.
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                      init_lora_weights=False)


def set_scales(root: nn.Module, scales: dict[str, float]) -> None:
    """What runtime_peft's ``update_adapter_scales`` does: write ``scaling[adapter]`` on every LoRA layer."""
    for layer in root.modules():
        if isinstance(layer, LoraLayer):
            for adapter, scale in scales.items():
                if adapter in layer.scaling:
                    layer.scaling[adapter] = scale


def fresh_calls(model: nn.Module, built_before: int) -> tuple[set[str], set[str]]:
    """``call_module`` targets and calls seen inside opaque leaves of the specialisations built since."""
    fresh = [spec for key, spec in model.surgery_state.specialisations.items() if key >= built_before]
    assert fresh, "no new specialisation was built"
    in_graph = {n.target for spec in fresh for n in spec.graph.nodes if n.op == "call_module"}
    in_leaves = {n for spec in fresh for leaf, inner in spec.leaf_calls.items() for n in (leaf, *inner)}
    return in_graph, in_leaves


def assert_exact(ours: StreamRecord, theirs: StreamRecord, what: str) -> None:
    assert compare(ours, theirs) == 0.0, what


# --------------------------------------------------------------------------- runtime PEFT
@pytest.mark.parametrize("name", NAMES)
def test_runtime_peft_exact_regex_disable_and_several_adapters(name, tmp_path):
    pair = make_pair(name, tmp_path)
    model, reference = pair.model, pair.reference
    vace_only = pair.stream(model)

    # Exact module names; the reference gets the same native modules under its own names.
    peft_model = get_peft_model(model, lora_config(EXACT))
    peft_ref = get_peft_model(reference, lora_config([ref_name(t) for t in EXACT]))
    assert lora_targets(model, "default") == set(EXACT)
    assert lora_targets(reference, "default", reference=True) == set(EXACT)
    assert type(model.get_submodule("vace_blocks.0.self_attn.q")) is nn.Linear  # no suffix spill-over
    first = lora_values(model, EXACT, rank=4, seed=11)
    set_lora(model, first, "default")
    set_lora(reference, first, "default", reference=True)
    ours, theirs = pair.streams()
    assert_exact(ours, theirs, "exact target names")
    assert compare(ours, vace_only) > 0.0  # the LoRA is really applied

    # Calling the PeftModel wrappers (as the module_targeted pipelines do) forwards vace_context.
    assert torch.equal(pair.one_call(peft_model), pair.one_call(peft_ref))

    # disable_adapter() gives back the VACE-only model exactly.
    with peft_model.disable_adapter():
        assert_exact(pair.stream(model), vace_only, "disable_adapter")

    # A second adapter chosen by a regex string (main and VACE blocks), both active with their
    # own scaling values, at a new resolution: the new specialisations are traced with LoRA
    # layers (main-block ffn included) in the tree.
    peft_model.add_adapter("second", lora_config(REGEX, rank=2, alpha=2.0))
    chosen = sorted(lora_targets(model, "second"))
    assert all(re.fullmatch(REGEX, t) for t in chosen)
    assert {"blocks.1.ffn.2", "vace_blocks.1.ffn.2", "vace_blocks.0.after_proj"} <= set(chosen)
    peft_ref.add_adapter("second", lora_config([ref_name(t) for t in chosen], rank=2, alpha=2.0))
    assert lora_targets(reference, "second", reference=True) == set(chosen)
    second = lora_values(model, chosen, rank=2, seed=12)
    set_lora(model, second, "second")
    set_lora(reference, second, "second", reference=True)
    for wrapper, root in ((peft_model, model), (peft_ref, reference)):
        wrapper.base_model.set_adapter(["default", "second"])
        set_scales(root, {"default": 0.75, "second": -1.5})
    assert model.get_submodule("blocks.0.ffn.2").active_adapters == ["default", "second"]
    built = model.surgery_state.built
    model.surgery_state.clear()  # cached graphs would serve RES_B too; trace anew with LoRA in the tree
    ours, theirs = pair.streams(RES_B)
    assert_exact(ours, theirs, "two adapters with scales, new resolution")
    in_graph, _ = fresh_calls(model, built)
    assert {"blocks.0.ffn.2", "blocks.1.ffn.0", "vace_blocks.0.after_proj"} <= in_graph


# --------------------------------------------------------------------------- module-targeted
def upstream_module_targeted(reference: nn.Module) -> list[str]:
    """LongLive's selection verbatim: every Linear inside a block whose class has one of two names."""
    names = []
    for name, module in reference.named_modules():
        if type(module).__name__ in ("CausalWanAttentionBlock", "BaseWanAttentionBlock"):
            names += [f"{name}.{sub}" for sub, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names


@pytest.mark.parametrize("name", NAMES)
def test_module_targeted_strategy(name, tmp_path):
    pair = make_pair(name, tmp_path)
    model, reference = pair.model, pair.reference
    targets = module_targeted_targets(model)
    upstream = upstream_module_targeted(reference)
    assert sorted(targets) == sorted(to_native_key(n) for n in upstream)
    assert len(targets) == len(set(targets)) == 40 + 4 * (name == "krea_realtime_video")  # + fused to_qkv
    assert not any(t.startswith("vace_blocks.") for t in targets)

    peft_model = get_peft_model(model, lora_config(targets, rank=4, alpha=4.0))
    peft_ref = get_peft_model(reference, lora_config(upstream, rank=4, alpha=4.0))
    assert lora_targets(model, "default") == set(targets)
    assert lora_targets(reference, "default", reference=True) == set(targets)  # none under vace_blocks
    values = lora_values(model, targets, rank=4, seed=21)
    set_lora(model, values, "default")
    set_lora(reference, values, "default", reference=True)
    # Streams run on the models themselves (PEFT injected in place): the pipelines' run-time
    # attribute writes (Krea's block_mask) would land on a PeftModel wrapper, not on the model.
    ours, theirs = pair.streams()
    assert_exact(ours, theirs, "module_targeted")
    # Upstream calls the PeftModel (generator.model); one call through the wrappers.
    with_lora = pair.one_call(peft_model)
    assert torch.equal(with_lora, pair.one_call(peft_ref))
    with peft_model.disable_adapter():
        assert not torch.equal(pair.one_call(peft_model), with_lora)


# --------------------------------------------------------------------------- new resolution, permanent merge
RETRACE_TARGETS = ["blocks.0.self_attn.o", "blocks.1.cross_attn.o", "blocks.2.ffn.0", "blocks.3.ffn.2",
                   "vace_blocks.0.ffn.0", "vace_blocks.1.after_proj", "vace_blocks.0.self_attn.k"]
GRAPH_TARGETS = {"blocks.2.ffn.0", "blocks.3.ffn.2", "vace_blocks.0.ffn.0", "vace_blocks.1.after_proj"}


@pytest.mark.parametrize("name", NAMES)
def test_new_resolution_after_lora_then_permanent_merge(name, tmp_path):
    pair = make_pair(name, tmp_path)
    model, reference = pair.model, pair.reference
    peft_model = get_peft_model(model, lora_config(RETRACE_TARGETS))
    peft_ref = get_peft_model(reference, lora_config([ref_name(t) for t in RETRACE_TARGETS]))
    values = lora_values(model, RETRACE_TARGETS, rank=4, seed=31)
    set_lora(model, values, "default")
    set_lora(reference, values, "default", reference=True)

    # A stream at a new resolution reuses the graphs traced before injection (they call
    # modules by name, so the LoRA wrappers run): exact.
    ours, theirs = pair.streams(RES_B)
    assert_exact(ours, theirs, "new resolution after LoRA injection, cached graphs")
    # With the cache dropped, every specialisation is traced with the LoRA layers in place,
    # and calls every target under its own name.
    built = model.surgery_state.built
    model.surgery_state.clear()
    ours, theirs = pair.streams(RES_B)
    assert_exact(ours, theirs, "new resolution after LoRA injection")
    in_graph, in_leaves = fresh_calls(model, built)
    assert set(RETRACE_TARGETS) <= in_graph | in_leaves
    assert GRAPH_TARGETS <= in_graph and all(isinstance(model.get_submodule(t), LoraLayer) for t in GRAPH_TARGETS)

    # permanent_merge: every adapter (here a second one too) merged into plain nn.Linear
    # layers under the original keys.
    extra = ["blocks.1.ffn.0", "blocks.0.self_attn.o", "vace_blocks.1.ffn.2", "vace_blocks.0.before_proj"]
    peft_model.add_adapter("extra", lora_config(extra, rank=2, alpha=1.0))
    peft_ref.add_adapter("extra", lora_config([ref_name(t) for t in extra], rank=2, alpha=1.0))
    values = lora_values(model, extra, rank=2, seed=32)
    set_lora(model, values, "extra")
    set_lora(reference, values, "extra", reference=True)
    merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=["default", "extra"])
    merged_ref = peft_ref.merge_and_unload(safe_merge=True, adapter_names=["default", "extra"])
    assert merged is model and merged_ref is reference
    assert list(model.state_dict()) == pair.keys
    for target in RETRACE_TARGETS + extra:
        assert type(model.get_submodule(target)) is nn.Linear
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    ours, theirs = pair.streams()
    assert_exact(ours, theirs, "merge_and_unload")


# --------------------------------------------------------------------------- LoRA files
FILE_TARGETS = {  # adapter -> native targets; file "style" has no prefix, "detail" a diffusion_model. prefix
    "style": ["blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.2.ffn.0", "blocks.3.ffn.2",
              "vace_blocks.0.self_attn.o", "vace_blocks.0.before_proj", "vace_blocks.1.ffn.2"],
    "detail": ["blocks.0.self_attn.q", "blocks.2.self_attn.o",
               "vace_blocks.1.cross_attn.v", "vace_blocks.1.after_proj"],
}
FILE_PREFIX = {"style": "", "detail": "diffusion_model."}
FILE_ALPHA = {"style": 2.0, "detail": None}  # no alpha tensor: scaling = scale * rank / rank
FILE_SCALE = {"style": 1.0, "detail": 0.5}


def write_lora_file(path: Path, values: dict[str, tuple[torch.Tensor, ...]], *, prefix: str,
                    alpha: float | None) -> Path:
    tensors = {}
    for target, (a, b) in values.items():
        tensors[f"{prefix}{target}.lora_A.weight"] = a.clone()
        tensors[f"{prefix}{target}.lora_B.weight"] = b.clone()
        if alpha is not None:
            tensors[f"{prefix}{target}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("name", NAMES)
def test_lora_files_in_native_key_schemes(name, tmp_path):
    pair = make_pair(name, tmp_path)
    model, reference = pair.model, pair.reference
    before = pair.one_call(model)
    files = {}
    for adapter, seed in (("style", 41), ("detail", 42)):
        values = lora_values(model, FILE_TARGETS[adapter], rank=4, seed=seed)
        files[adapter] = values
        path = write_lora_file(tmp_path / f"{adapter}.safetensors", values, prefix=FILE_PREFIX[adapter],
                               alpha=FILE_ALPHA[adapter])
        report = load_lora_file(model, path, adapter_name=adapter, scale=FILE_SCALE[adapter])
        assert report.model is model and set(report.targets) == set(FILE_TARGETS[adapter])
        assert report.groups.get("vace_blocks", 0) == sum(t.startswith("vace_blocks.") for t in FILE_TARGETS[adapter])
        for target, (a, b) in values.items():
            layer = model.get_submodule(target)
            assert torch.equal(layer.lora_A[adapter].weight, a) and torch.equal(layer.lora_B[adapter].weight, b)

    # The reference receives the same LoRA through plain PEFT, by mapped name.
    peft_ref = None
    for adapter, values in files.items():
        config = lora_config([ref_name(t) for t in values], rank=4, alpha=FILE_ALPHA[adapter] or 4.0)
        if peft_ref is None:
            peft_ref = get_peft_model(reference, config, adapter_name=adapter)
        else:
            peft_ref.add_adapter(adapter, config)
        set_lora(reference, values, adapter, reference=True)
        for native in values:
            reference.get_submodule(ref_name(native)).set_scale(adapter, FILE_SCALE[adapter])
    peft_ref.base_model.set_adapter(["style", "detail"])
    shared = model.get_submodule("blocks.0.self_attn.q")
    assert shared.active_adapters == ["style", "detail"]
    assert shared.scaling == {"style": 0.5, "detail": 0.5}  # alpha / rank; scale * rank / rank
    assert reference.get_submodule(ref_name("blocks.0.self_attn.q")).scaling == shared.scaling

    ours, theirs = pair.streams()
    assert_exact(ours, theirs, "LoRA files: plain keys + diffusion_model. prefix")
    assert not torch.equal(ours.calls[0].output, before)


# --------------------------------------------------------------------------- order
def test_order_is_enforced(tmp_path):
    pair = make_pair("longlive", tmp_path)
    pipeline = pair.pipeline
    call = example_call(pair.model, pipeline)

    # LoRA on the base model, then surgery: refused, as a PeftModel and with layers injected in place.
    base = pipeline.build("tiny", seed=0)
    wrapped = get_peft_model(base, lora_config(["blocks.0.self_attn.q"]))
    with pytest.raises(OrderError) as info:
        surgery.apply(wrapped, vace.rule(), example_inputs=call)
    assert "Base -> vace -> LoRA" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(OrderError, match="Base -> vace -> LoRA"):
        surgery.apply(base, vace.rule(), example_inputs=call)

    # LoRA after surgery is the right order; surgery, or VACE weights, after it are not.
    get_peft_model(pair.model, lora_config(["blocks.1.ffn.0", "vace_blocks.0.ffn.0"]))
    with pytest.raises(OrderError, match="Base -> vace -> LoRA"):
        surgery.apply(pair.model, vace.rule(), example_inputs=call)
    with pytest.raises(OrderError, match="Base -> vace -> LoRA"):
        check_order(pair.model)
    path = tmp_path / "vace2.safetensors"
    save_file(random_vace_state_dict(pair.reference, seed=4), str(path))
    with pytest.raises(OrderError):
        load_vace_weights(pair.model, path)


# --------------------------------------------------------------------------- graph-only check
def test_uncalled_targets_and_report(tmp_path):
    qkv = ["self_attn.q", "self_attn.k", "self_attn.v"]
    krea = make_pair("krea_realtime_video", tmp_path / "krea")
    bypassed = sorted(f"blocks.{i}.self_attn.{p}" for i in range(4) for p in "qkv")
    assert uncalled_targets(krea.model, qkv) == bypassed  # fused into to_qkv; the VACE blocks' are unfused
    assert uncalled_targets(krea.model, r"vace_blocks\..*") == []
    assert uncalled_linear(krea.model) == bypassed

    report = build_report(krea.result)
    assert report["lora"] == {"uncalled_linear": bypassed}
    md = render_markdown(report, None, None)
    assert "## LoRA" in md and "| `blocks.*.self_attn.q` | x4 |" in md and "`blocks.3.self_attn.v`" in md

    # After LoRA injection the check still names targets, never PEFT's internals.
    get_peft_model(krea.model, lora_config(["blocks.0.self_attn.q", "blocks.0.self_attn.o",
                                            "vace_blocks.0.self_attn.q"]))
    assert uncalled_linear(krea.model) == bypassed
    assert uncalled_targets(krea.model, ["blocks.0.self_attn.q"]) == ["blocks.0.self_attn.q"]

    longlive = make_pair("longlive", tmp_path / "longlive")
    assert uncalled_targets(longlive.model, qkv) == []
    report = build_report(longlive.result)
    assert report["lora"] == {"uncalled_linear": []}
    assert "## LoRA" not in render_markdown(report, None, None)
