"""LoRA files into a grafted module: key schemes, PEFT injection, built-in targets, order check."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from rules import vace
from rules.vace.keymaps import DIFFUSERS_TO_NATIVE, NATIVE_TO_DIFFUSERS
from surgery.errors import MatchError, OrderError, RuleError, SurgeryError, WeightsError
from surgery.lora import check_order, load_lora_file, module_targeted_targets, peft_layer_names
from surgery.weights import apply_key_map, compile_key_map

DIM, FFN = 16, 32
VACE_LAYERS = (0, 2)


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm_q = nn.RMSNorm(DIM)


class Block(nn.Module):
    """One class for main and VACE blocks, so only structure can tell them apart."""

    def __init__(self, vace: bool) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = Attn(), Attn()
        self.norm3 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(), nn.Linear(FFN, DIM))
        if vace:
            self.after_proj = nn.Linear(DIM, DIM)


class Grafted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(False) for _ in range(4))
        self.vace_blocks = nn.ModuleList(Block(True) for _ in VACE_LAYERS)
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Touches every Linear, so a traced GraphModule keeps them all.
        for block in [*self.blocks, *self.vace_blocks]:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    x = x + m(x.mean(-1, keepdim=True).repeat(1, m.in_features)).mean(-1, keepdim=True)
        return self.head(x)


TARGETS = {  # native target -> (rank, alpha or None)
    "blocks.0.self_attn.q": (4, 8.0),
    "blocks.1.cross_attn.o": (4, None),
    "blocks.3.ffn.0": (2, 1.0),
    "vace_blocks.0.self_attn.k": (4, 2.0),
    "vace_blocks.1.ffn.2": (4, None),
    "vace_blocks.1.after_proj": (4, 4.0),
}


def lora_values(seed: int = 11) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = Grafted()
    out = {}
    for target, (rank, alpha) in TARGETS.items():
        linear = model.get_submodule(target)
        vals = {
            "A": torch.randn(rank, linear.in_features, generator=g) + 0.1,
            "B": torch.randn(linear.out_features, rank, generator=g) + 0.1,
        }
        if alpha is not None:
            vals["alpha"] = torch.tensor(alpha)
        out[target] = vals
    return out


def ditto_name(target: str) -> str:
    m = re.match(r"^vace_blocks\.(\d+)\.(.+)$", target)
    return f"blocks.{VACE_LAYERS[int(m[1])]}.vace.{m[2]}" if m else target


SCHEMES = {
    "peft": lambda t, role: f"{t}.lora_{role}.weight" if role != "alpha" else f"{t}.alpha",
    "diffusion_model prefix": lambda t, role: "diffusion_model." + SCHEMES["peft"](t, role),
    "up/down": lambda t, role: f"{t}.{ {'A': 'lora_down', 'B': 'lora_up'}[role]}.weight" if role != "alpha"
    else f"{t}.alpha",
    "adapter name in keys": lambda t, role: f"{t}.lora_{role}.default.weight" if role != "alpha" else f"{t}.alpha",
    "ditto": lambda t, role: SCHEMES["peft"](ditto_name(t), role),
    "comfy prefix + up/down": lambda t, role: "model.diffusion_model." + SCHEMES["up/down"](t, role),
}


def write_lora(path: Path, name_of, values=None) -> Path:
    values = values or lora_values()
    save_file({name_of(t, role): v.clone() for t, vals in values.items() for role, v in vals.items()}, str(path))
    return path


def adapter_weights(model: nn.Module, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from peft.tuners.lora import LoraLayer

    return {
        n: (m.lora_A[adapter].weight.detach().clone(), m.lora_B[adapter].weight.detach().clone(), m.scaling[adapter])
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def expect_unchanged_error(model: nn.Module, pattern: str, *args, exc=WeightsError, **kwargs) -> Exception:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=pattern) as info:
        load_lora_file(model, *args, **kwargs)
    assert not peft_layer_names(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------- schemes
def test_all_schemes_load_the_same_adapter(tmp_path):
    values = lora_values()
    results = {}
    for name, scheme in SCHEMES.items():
        model = Grafted()
        path = write_lora(tmp_path / f"{name.replace('/', '_').replace(' ', '_')}.safetensors", scheme)
        report = load_lora_file(model, path, schemes=vace.lora_schemes(VACE_LAYERS))
        assert report.model is model and type(model) is Grafted
        assert set(report.targets) == set(TARGETS) and report.groups == {"blocks": 3, "vace_blocks": 3}
        assert report.ranks == {4: 5, 2: 1} and report.with_alpha == 4
        results[name] = adapter_weights(model)
        assert set(results[name]) == set(TARGETS)
        # Untargeted twins stay plain Linear (exact names, no suffix spill-over).
        assert type(model.vace_blocks[0].self_attn.q) is nn.Linear
        assert type(model.blocks[0].self_attn.k) is nn.Linear
    for name, got in results.items():
        for target, (a, b, scaling) in got.items():
            rank, alpha = TARGETS[target]
            assert torch.equal(a, values[target]["A"]) and torch.equal(b, values[target]["B"]), (name, target)
            assert scaling == (alpha if alpha is not None else rank) / rank, (name, target)


def test_diffusers_names_with_key_map(tmp_path):
    to_diff = compile_key_map(NATIVE_TO_DIFFUSERS)

    def name_of(t: str, role: str) -> str:
        diff = apply_key_map(f"{t}.weight", to_diff).removesuffix(".weight")
        return f"transformer.{diff}." + (f"lora_{role}.weight" if role != "alpha" else "alpha")

    path = write_lora(tmp_path / "diffusers.safetensors", name_of)
    model = Grafted()
    report = load_lora_file(model, path, key_map=DIFFUSERS_TO_NATIVE)
    assert set(report.targets) == set(TARGETS)  # vace_blocks.1.proj_out -> after_proj, not head
    values = lora_values()
    for target, (a, b, _) in adapter_weights(model).items():
        assert torch.equal(a, values[target]["A"]) and torch.equal(b, values[target]["B"])


def test_forward_and_scale(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", SCHEMES["peft"])
    model = Grafted()
    layer_name, (rank, alpha) = "vace_blocks.0.self_attn.k", TARGETS["vace_blocks.0.self_attn.k"]
    base = model.get_submodule(layer_name)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    report = load_lora_file(model, path, scale=0.5)
    assert report.scale == 0.5
    layer = model.get_submodule(layer_name)
    x = torch.randn(3, DIM)
    a, b = lora_values()[layer_name]["A"], lora_values()[layer_name]["B"]
    want = F.linear(x, weight, bias) + F.linear(F.linear(x, a), b) * (0.5 * alpha / rank)
    assert torch.equal(layer(x), want)
    layer.set_scale("default", 0.0)  # run-time scale still works through PEFT
    assert torch.equal(layer(x), F.linear(x, weight, bias))


def test_two_adapters_are_both_active(tmp_path):
    first = write_lora(tmp_path / "a.safetensors", SCHEMES["peft"], lora_values(1))
    second = write_lora(tmp_path / "b.safetensors", SCHEMES["peft"], lora_values(2))
    model = Grafted()
    load_lora_file(model, first, adapter_name="a")
    load_lora_file(model, second, adapter_name="b")
    layer = model.get_submodule("blocks.1.cross_attn.o")
    assert sorted(layer.active_adapters) == ["a", "b"]
    x = torch.randn(2, DIM)
    base = layer.get_base_layer()
    want = base(x)
    for n in layer.active_adapters:  # PEFT's own accumulation order, so the result is bit-exact
        want = want + layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n]
    assert torch.equal(layer(x), want)
    # A third adapter on one layer only leaves the other layers' active sets alone.
    only = {"blocks.0.self_attn.q": lora_values(3)["blocks.0.self_attn.q"]}
    load_lora_file(model, write_lora(tmp_path / "c.safetensors", SCHEMES["peft"], only), adapter_name="c")
    assert model.get_submodule("blocks.0.self_attn.q").active_adapters == ["a", "b", "c"]
    assert layer.active_adapters == ["a", "b"]
    expect = "adapter 'a' is already loaded"
    with pytest.raises(WeightsError, match=expect):
        load_lora_file(model, first, adapter_name="a")


def test_requires_grad_is_preserved(tmp_path):
    model = Grafted()
    model.blocks[0].requires_grad_(False)
    load_lora_file(model, write_lora(tmp_path / "l.safetensors", SCHEMES["peft"]))
    assert model.blocks[0].self_attn.q.base_layer.weight.requires_grad is False
    assert model.vace_blocks[0].self_attn.k.base_layer.weight.requires_grad is True
    assert model.head.weight.requires_grad is True


# --------------------------------------------------------------------------- errors
def test_unknown_keys(tmp_path):
    values = lora_values()
    tensors = {SCHEMES["peft"](t, r): v for t, vals in values.items() for r, v in vals.items()}
    tensors["blocks.0.norm3.diff"] = torch.ones(DIM)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    expect_unchanged_error(Grafted(), "not LoRA A/B/alpha tensors .*blocks.0.norm3.diff", tmp_path / "x.safetensors")


def test_missing_and_non_linear_targets(tmp_path):
    values = lora_values()
    values["blocks.9.self_attn.q"] = values["blocks.0.self_attn.q"]
    values["blocks.0.norm3"] = {"A": torch.ones(2, DIM), "B": torch.ones(DIM, 2)}
    path = write_lora(tmp_path / "m.safetensors", SCHEMES["peft"], values)
    err = expect_unchanged_error(Grafted(), "not in the model .*blocks.9.self_attn.q", path)
    assert "blocks.0.norm3 (LayerNorm)" in str(err)


def test_shape_and_rank_mismatch(tmp_path):
    values = lora_values()
    values["blocks.0.self_attn.q"] = {"A": torch.ones(4, DIM), "B": torch.ones(DIM, 3)}
    values["blocks.3.ffn.0"] = {"A": torch.ones(2, FFN), "B": torch.ones(FFN, 2)}
    path = write_lora(tmp_path / "s.safetensors", SCHEMES["peft"], values)
    err = expect_unchanged_error(Grafted(), "2 LoRA targets have matrices that do not fit", path)
    assert "blocks.3.ffn.0: A [2, 32] B [32, 2] vs Linear(16, 32)" in str(err)


def test_incomplete_pair_and_nan(tmp_path):
    values = lora_values()
    del values["vace_blocks.1.ffn.2"]["B"]
    expect_unchanged_error(Grafted(), "lack an A or B matrix .*vace_blocks.1.ffn.2",
                           write_lora(tmp_path / "p.safetensors", SCHEMES["peft"], values))
    values = lora_values()
    values["vace_blocks.1.ffn.2"]["B"][0, 0] = float("nan")
    expect_unchanged_error(Grafted(), "vace_blocks.1.ffn.2.lora_B.weight' contains NaN",
                           write_lora(tmp_path / "n.safetensors", SCHEMES["peft"], values))


def test_ditto_needs_vace_layers(tmp_path):
    path = write_lora(tmp_path / "d.safetensors", SCHEMES["ditto"])
    expect_unchanged_error(Grafted(), "needs the model's vace_layers", path, schemes=vace.lora_schemes(None))
    expect_unchanged_error(Grafted(), "main layer 2, but vace_layers is \\[0, 1\\]", path,
                           schemes=vace.lora_schemes([0, 1]))
    model = Grafted()
    model.vace_layers = list(VACE_LAYERS)  # the hand-written reference's attribute
    assert load_lora_file(model, path, schemes=vace.lora_schemes(vace.model_layers(model))).groups["vace_blocks"] == 3
    # Without the rule's schemes a Ditto key is an ordinary (missing) target: the engine knows no VACE naming.
    expect_unchanged_error(Grafted(), "blocks.2.vace", path)


def test_pickle_and_peft_model_refused(tmp_path):
    marker = tmp_path / "UNPICKLED"

    class Marker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "lora.pt"
    path.write_bytes(pickle.dumps(Marker()))
    err = expect_unchanged_error(Grafted(), "pickle", path)
    assert not marker.exists() and "lora.safetensors" in str(err)

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(Grafted(), LoraConfig(r=2, target_modules=["head"]))
    with pytest.raises(WeightsError, match="get_base_model"):
        load_lora_file(wrapped, write_lora(tmp_path / "l.safetensors", SCHEMES["peft"]))


# --------------------------------------------------------------------------- targets and order
def test_module_targeted_targets_are_main_block_linears_only():
    model = Grafted()
    targets = module_targeted_targets(model)
    per_block = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    assert targets == [f"blocks.{i}.{p}" for i in range(4) for p in per_block]

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert sorted(peft_model.base_model.targeted_module_names) == sorted(targets)
    assert type(model.vace_blocks[0].self_attn.q) is nn.Linear
    # Already-wrapped layers are still listed (PEFT adds further adapters to them), nothing inside them is.
    assert module_targeted_targets(model) == targets


def test_module_targeted_targets_on_a_traced_graph_module():
    model = Grafted()
    gm = torch.fx.symbolic_trace(model)
    assert not isinstance(gm.get_submodule("blocks"), nn.ModuleList)  # fx rebuilds plain containers
    assert module_targeted_targets(gm) == module_targeted_targets(model)
    x = torch.randn(2, DIM)
    assert torch.equal(gm(x), model(x))


def test_module_targeted_targets_errors():
    with pytest.raises(MatchError, match="no 'blocks' list"):
        module_targeted_targets(nn.Sequential(nn.Linear(2, 2)))
    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.LayerNorm(3)])
    with pytest.raises(MatchError, match="contain no nn.Linear"):
        module_targeted_targets(holder)


def test_check_order(tmp_path):
    model = Grafted()
    check_order(model)  # plain model: fine
    load_lora_file(model, write_lora(tmp_path / "l.safetensors", SCHEMES["peft"]))
    with pytest.raises(OrderError, match="Base -> surgery -> LoRA") as info:
        check_order(model)
    assert "blocks.0.self_attn.q" in str(info.value)

    from peft import LoraConfig, get_peft_model

    with pytest.raises(OrderError, match="already a PEFT PeftModel"):
        check_order(get_peft_model(Grafted(), LoraConfig(r=2, target_modules=["head"])))


# --------------------------------------------------------------------------- all or nothing
def model_state(model: nn.Module) -> tuple:
    """Everything a LoRA load may touch: module tree (by identity), parameters, values, flags, PEFT state."""
    from peft.tuners.lora import LoraLayer

    return (
        [(n, type(m), id(m)) for n, m in model.named_modules()],
        [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
        sorted(vars(model)),
        sorted(getattr(model, "peft_config", {})),
        {n: (list(m.lora_A), dict(m.scaling), dict(m.r), list(m.active_adapters))
         for n, m in model.named_modules() if isinstance(m, LoraLayer)},
    )


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[1] == after[1] and before[3:] == after[3:]
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])


def refused(model: nn.Module, pattern: str, *args, **kwargs) -> str:
    """load_lora_file fails with a one-line WeightsError matching ``pattern`` and changes nothing."""
    before = model_state(model)
    with pytest.raises(WeightsError, match=pattern) as info:
        load_lora_file(model, *args, **kwargs)
    assert_same_state(before, model_state(model))
    message = str(info.value)
    assert "\n" not in message and "; fix: " in message
    return message


def test_a_rank_zero_pair_next_to_a_valid_one_changes_nothing_and_a_retry_works(tmp_path):
    values = {"blocks.0.self_attn.q": lora_values()["blocks.0.self_attn.q"],
              "blocks.1.self_attn.q": {"A": torch.ones(0, DIM), "B": torch.ones(DIM, 0)}}
    path = write_lora(tmp_path / "r0.safetensors", SCHEMES["peft"], values)
    model = Grafted()
    for _ in range(2):  # the second try must meet the same check, not "adapter already loaded"
        message = refused(model, "1 LoRA targets have rank 0 .*blocks.1.self_attn.q", path)
        assert "rank >= 1" in message
    del values["blocks.1.self_attn.q"]
    report = load_lora_file(model, write_lora(tmp_path / "ok.safetensors", SCHEMES["peft"], values))
    assert report.targets == ("blocks.0.self_attn.q",)


@pytest.mark.parametrize("scale, needle", [
    ("1.0", "scale must be a real number, got str '1.0'"),
    (True, "scale must be a real number, got bool"),
    (None, "scale must be a real number, got NoneType"),
    (torch.tensor(1.0), "scale must be a real number, got Tensor"),
    (float("nan"), "scale nan is not a finite number"),
    (float("inf"), "scale inf is not a finite number"),
    (10 ** 400, "is not a finite number"),
    (1e300, "scaling 2e\\+300 .*is beyond float32"),
])
def test_bad_scale_is_refused_before_anything_is_injected(scale, needle, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", SCHEMES["peft"])
    model = Grafted()
    refused(model, needle, path, scale=scale)
    assert load_lora_file(model, path, scale=1.0).scale == 1.0  # then the same call with a good scale works


@pytest.mark.parametrize("layers, needle", [
    ("0,2", "vace_layers must be a sequence of non-negative ints, got '0,2'"),
    ([0, 1.5], "vace_layers must be a sequence of non-negative ints"),
])
def test_bad_vace_layers_for_the_ditto_scheme_are_one_line_errors(layers, needle):
    with pytest.raises(WeightsError, match=needle) as info:
        vace.lora_schemes(layers)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"adapter_name": ""}, "adapter_name '' is not a usable adapter name"),
    ({"adapter_name": "a.b"}, "adapter_name 'a.b' is not a usable"),
    ({"adapter_name": 3}, "adapter_name 3 is not a usable"),
    ({"strip_prefixes": "diffusion_model."}, "strip_prefixes must be a sequence of strings"),
    ({"key_map": 5}, "key_map must be a sequence"),
])
def test_bad_arguments_are_one_line_errors(kwargs, needle, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", SCHEMES["peft"])
    exc = RuleError if "key_map" in kwargs else WeightsError
    model = Grafted()
    before = model_state(model)
    with pytest.raises(exc, match=needle) as info:
        load_lora_file(model, path, **kwargs)
    assert isinstance(info.value, SurgeryError) and "\n" not in str(info.value)
    assert_same_state(before, model_state(model))


def test_bad_path_and_module_types(tmp_path):
    refused(Grafted(), "the LoRA path must be a str or os.PathLike, got int", 5)
    with pytest.raises(WeightsError, match="needs a torch.nn.Module, got dict"):
        load_lora_file({}, write_lora(tmp_path / "l.safetensors", SCHEMES["peft"]))


@pytest.mark.parametrize("target_values, needle", [
    ({"A": torch.ones(4, DIM, dtype=torch.int32), "B": torch.ones(DIM, 4)}, "has dtype torch.int32; A/B must be"),
    ({"A": torch.ones(4, DIM), "B": torch.ones(DIM, 4), "alpha": torch.tensor(True)}, "alpha must be a real number"),
    ({"A": torch.ones(4, DIM), "B": torch.ones(DIM, 4), "alpha": torch.ones(2)}, "alpha has shape \\[2\\]"),
    ({"A": torch.ones(4, DIM), "B": torch.ones(DIM, 4), "alpha": torch.tensor(float("inf"))}, "alpha' contains NaN"),
    ({"A": torch.ones(4, DIM, 1), "B": torch.ones(DIM, 4)}, "A \\[4, 16, 1\\] B \\[16, 4\\]"),
])
def test_malformed_pairs_are_refused_whole(target_values, needle, tmp_path):
    values = lora_values()
    values["blocks.1.cross_attn.o"] = target_values
    refused(Grafted(), needle, write_lora(tmp_path / "m.safetensors", SCHEMES["peft"], values))


class Half(Grafted):
    def __init__(self) -> None:
        super().__init__()
        self.half()


@pytest.mark.parametrize("change, scale, needle", [
    ({"A": 1e5}, 1.0, "A/B values overflow float16 \\(largest \\|value\\| 100000\\)"),  # inf once in float16
    ({}, 1e5, "scaling 100000 \\(scale 100000 \\* alpha 4 / rank 4\\) is beyond float16"),
    ({"A": 300.0, "B": 300.0}, 1.0, "the update B @ A \\* scaling reaches 360000, beyond float16"),
])
def test_overflow_in_the_models_dtype_is_refused(change, scale, needle, tmp_path):
    values = {"blocks.1.cross_attn.o": {"A": torch.full((4, DIM), 0.5), "B": torch.full((DIM, 4), 0.5)}}
    for role, value in change.items():
        values["blocks.1.cross_attn.o"][role] = torch.full_like(values["blocks.1.cross_attn.o"][role], value)
    path = write_lora(tmp_path / "big.safetensors", SCHEMES["peft"], values)
    refused(Half(), needle, path, scale=scale)
    load_lora_file(Grafted(), path, scale=scale)  # the same file fits a float32 model


def _failing_on_call(monkeypatch, calls: int, exc: BaseException) -> None:
    """Make PEFT's per-layer injection raise on call ``calls`` (after wrapping the earlier layers)."""
    from peft.tuners.lora import LoraModel

    real = LoraModel._create_and_replace
    count = {"n": 0}

    def flaky(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", flaky)


@pytest.mark.parametrize("exc", [RuntimeError("PEFT failed on the third layer"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_injection_failing_half_way_is_undone_and_a_retry_works(exc, tmp_path, monkeypatch):
    path = write_lora(tmp_path / "l.safetensors", SCHEMES["peft"])
    model = Grafted()
    x = torch.randn(2, DIM)
    want = model(x)
    before = model_state(model)
    _failing_on_call(monkeypatch, 3, exc)
    with pytest.raises(type(exc)):
        load_lora_file(model, path)
    assert_same_state(before, model_state(model))
    assert not peft_layer_names(model) and not hasattr(model, "peft_config")
    assert torch.equal(model(x), want)
    monkeypatch.undo()
    report = load_lora_file(model, path)  # same adapter name: nothing of the failed try is left
    assert set(report.targets) == set(TARGETS)


def test_failure_while_filling_a_second_adapter_leaves_the_first_as_it_was(tmp_path, monkeypatch):
    from peft.tuners.lora import LoraLayer

    model = Grafted()
    load_lora_file(model, write_lora(tmp_path / "a.safetensors", SCHEMES["peft"], lora_values(1)), adapter_name="a")
    x = torch.randn(2, DIM)
    want = model(x)
    before = model_state(model)
    second = write_lora(tmp_path / "b.safetensors", SCHEMES["peft"], lora_values(2))
    calls = {"n": 0}
    real = LoraLayer.set_scale

    def set_scale(self, adapter, scale):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("set_scale failed")
        return real(self, adapter, scale)

    monkeypatch.setattr(LoraLayer, "set_scale", set_scale)
    with pytest.raises(RuntimeError, match="set_scale failed"):
        load_lora_file(model, second, adapter_name="b")
    assert_same_state(before, model_state(model))
    assert sorted(model.peft_config) == ["a"] and torch.equal(model(x), want)
    monkeypatch.undo()
    load_lora_file(model, second, adapter_name="b")
    assert sorted(model.get_submodule("blocks.1.cross_attn.o").active_adapters) == ["a", "b"]
