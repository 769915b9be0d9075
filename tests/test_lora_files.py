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

from rules.vace_keymaps import DIFFUSERS_TO_NATIVE, NATIVE_TO_DIFFUSERS
from surgery.errors import MatchError, OrderError, WeightsError
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
        report = load_lora_file(model, path, vace_layers=VACE_LAYERS)
        assert report.model is model and type(model) is Grafted
        assert set(report.targets) == set(TARGETS) and (report.main_targets, report.vace_targets) == (3, 3)
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
    expect_unchanged_error(Grafted(), "needs the model's vace_layers", path)
    expect_unchanged_error(Grafted(), "main layer 2, but vace_layers is \\[0, 1\\]", path, vace_layers=[0, 1])
    model = Grafted()
    model.vace_layers = list(VACE_LAYERS)  # taken from the module when not passed
    assert load_lora_file(model, path).vace_targets == 3


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
    with pytest.raises(OrderError, match="Base -> VACE -> LoRA") as info:
        check_order(model)
    assert "blocks.0.self_attn.q" in str(info.value)

    from peft import LoraConfig, get_peft_model

    with pytest.raises(OrderError, match="already a PEFT PeftModel"):
        check_order(get_peft_model(Grafted(), LoraConfig(r=2, target_modules=["head"])))
