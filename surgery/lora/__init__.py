"""LoRA after surgery: file loading through PEFT, built-in targets, and the order check."""
from surgery.lora.keys import DEFAULT_LORA_PREFIXES, TargetScheme, parse_lora_keys
from surgery.lora.loader import load_lora_file, rule_schemes
from surgery.lora.order import check_order, peft_layer_names
from surgery.lora.report import LoraLoadReport
from surgery.lora.targets import module_targeted_targets

__all__ = [
    "DEFAULT_LORA_PREFIXES",
    "LoraLoadReport",
    "TargetScheme",
    "check_order",
    "load_lora_file",
    "module_targeted_targets",
    "parse_lora_keys",
    "peft_layer_names",
    "rule_schemes",
]
