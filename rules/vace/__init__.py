"""The ``vace`` rule: VACE's control branch grafted into a transformer found by structure.

* :mod:`.config`: the options (``OPTIONS``) and the ``vace_layers`` check;
* :mod:`.profiles`: the model families as data (:class:`VaceProfile`, detected per model);
* :mod:`.rule`: the rule itself (:func:`rule`) and its actions, registered as ``vace`` in ``rules.RULES``;
* :mod:`.inputs`: the call inputs (control contexts and scales), checked before any graph runs;
* :mod:`.keymaps`: checkpoint key maps between the diffusers and the native layout;
* :mod:`.lora_keys`: the Wan2GP "Ditto" LoRA key scheme (``blocks.N.vace.*``);
* :mod:`.weights`: the rule's checks of a weights file (``Rule.check_weights``) and :func:`load_vace_weights`.
"""
from __future__ import annotations

from .config import OPTIONS, check_layers
from .inputs import check_context, check_inputs, several_contexts
from .keymaps import DIFFUSERS_TO_NATIVE, NATIVE_TO_DIFFUSERS
from .lora_keys import check_vace_layers, lora_schemes, model_layers
from .profiles import DIFFUSERS, FALLBACK, PROFILES, WAN, Detect, VaceProfile, detect, resolve
from .rule import NAME, branch_hints, compute_hints, inject_hint, normalise_scale, rule
from .weights import DEFAULT_VACE_PREFIXES, load_vace_weights, weight_checks

# Users call it as ``rules.vace.rule``; messages and reprs name it so, not by its defining module.
rule.__module__ = __name__

__all__ = ["DEFAULT_VACE_PREFIXES", "DIFFUSERS", "DIFFUSERS_TO_NATIVE", "FALLBACK", "NAME", "NATIVE_TO_DIFFUSERS", "OPTIONS", "PROFILES", "WAN",
           "Detect", "VaceProfile", "branch_hints", "check_context", "check_inputs", "check_layers", "check_vace_layers", "compute_hints",
           "detect", "inject_hint", "load_vace_weights", "lora_schemes", "model_layers", "normalise_scale", "resolve", "rule",
           "several_contexts", "weight_checks"]
