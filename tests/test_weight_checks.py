"""A rule's weights load through the engine by the rule's own data (#12 item 1): its
``weight_prefixes``, its name in messages, and its ``check_weights`` (``WeightChecks``), on a
small model written here, with no VACE name involved."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rules import ffn_adapter
from surgery.errors import WeightsError
from surgery.weights import WeightChecks, load_rule_weights
from surgery.weights.loader import MISMATCH_FIX


class Adapted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.side = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4))


def _rule(checks: WeightChecks | None = None):
    return dataclasses.replace(ffn_adapter.rule(), weight_prefixes=("side.",), check_weights=checks)


def _file(tmp_path, drop: str | None = None, scale: float = 1.0) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * scale for k, v in Adapted().state_dict().items()}
    if drop is not None:
        del weights[drop]
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    return str(path), weights


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_a_rule_without_checks_loads_its_prefixes_only_and_names_itself(tmp_path):
    path, weights = _file(tmp_path)
    model = Adapted()
    body = model.body.weight.clone()
    report = load_rule_weights(model, path, rule=_rule())
    assert report.tensors == 4 and report.ignored == 2 and report.facts == {}
    assert torch.equal(model.side[1].weight, weights["side.1.weight"]) and torch.equal(model.body.weight, body)

    path, _ = _file(tmp_path, drop="side.1.bias")
    before = {k: v.clone() for k, v in Adapted().state_dict().items()}
    fresh = Adapted()
    fresh.load_state_dict(before)
    with pytest.raises(WeightsError, match=r"1 ffn-adapter keys missing from the file \(side\.1\.bias\)") as err:
        load_rule_weights(fresh, path, rule=_rule())
    assert err.value.fix == MISMATCH_FIX and _unchanged(fresh, before)


def test_the_rules_checks_run_label_report_and_refuse_before_the_model_changes(tmp_path):
    seen = []

    def fit(where, stored, held):
        seen.append((sorted(stored), sorted(held)))
        if stored["side.0.weight"].shape != tuple(held["side.0.weight"].shape):
            raise WeightsError(f"{where} is for another width", "use the right file")
        return {"side width": stored["side.0.weight"].shape[0]}

    def value(key, entry, converted):
        if key == "side.1.weight" and converted.abs().max() > 100:
            raise WeightsError(f"{entry.name} is out of range", "retrain")

    checks = WeightChecks(label="SIDE", fit=fit, value=value, mismatch_fix="use the side file")
    path, _ = _file(tmp_path)
    model = Adapted()
    report = load_rule_weights(model, path, rule=_rule(checks))
    assert report.facts == {"side width": 2} and ("side width", "2") in report.as_rows()
    assert seen == [(["side.0.bias", "side.0.weight", "side.1.bias", "side.1.weight"],) * 2]

    big, _ = _file(tmp_path, scale=1000.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="side.1.weight is out of range"):
        load_rule_weights(model, big, rule=_rule(checks))
    assert _unchanged(model, before)

    missing, _ = _file(tmp_path, drop="side.0.bias")
    with pytest.raises(WeightsError, match="1 SIDE keys missing") as err:
        load_rule_weights(model, missing, rule=_rule(checks))
    assert err.value.fix == "use the side file" and _unchanged(model, before)

    with pytest.raises(WeightsError, match="the model has no SIDE parameters"):
        load_rule_weights(nn.Linear(4, 4), path, rule=_rule(checks))
