"""Loading a rule's grafted weights from safetensors checkpoints (:func:`load_rule_weights`, by the
rule's own prefixes, key maps and checks; :func:`load_weights` for given prefixes), and a base
model's weights from a base or full checkpoint (:func:`load_base_weights`)."""
from surgery.weights.base import base_dtype, base_keys, load_base_weights
from surgery.weights.checks import WeightChecks
from surgery.weights.files import PICKLE_SUFFIXES, TensorEntry, read_header, resolve_checkpoint
from surgery.weights.keys import KeyMap, KeyRule, apply_key_map, compile_key_map, strip_prefix
from surgery.weights.loader import DEFAULT_STRIP_PREFIXES, load_weights
from surgery.weights.paths import require_regular_file
from surgery.weights.report import LoadReport
from surgery.weights.rule import load_rule_weights

__all__ = [
    "DEFAULT_STRIP_PREFIXES",
    "KeyMap",
    "KeyRule",
    "LoadReport",
    "PICKLE_SUFFIXES",
    "TensorEntry",
    "WeightChecks",
    "apply_key_map",
    "base_dtype",
    "base_keys",
    "compile_key_map",
    "load_base_weights",
    "load_rule_weights",
    "load_weights",
    "read_header",
    "require_regular_file",
    "resolve_checkpoint",
    "strip_prefix",
]
