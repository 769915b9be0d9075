"""The ``ffn-adapter`` rule: a zero-initialised bottleneck adapter after every feed-forward unit.

* :mod:`.config`: the options (:class:`FfnAdapterConfig`);
* :mod:`.adapter`: the grafted module (:class:`BottleneckAdapter`);
* :mod:`.rule`: the rule itself (:func:`rule`), registered as ``ffn-adapter`` in ``rules.RULES``;
* :mod:`.reference`: the rule written by hand (:class:`AdaptedFFN`), which validation compares with.
"""
from __future__ import annotations

from .adapter import BottleneckAdapter, build_adapter
from .config import ACTIVATIONS, FfnAdapterConfig
from .reference import AdaptedFFN, adapter_path
from .rule import NAME, add_adapter, rule

__all__ = ["ACTIVATIONS", "NAME", "AdaptedFFN", "BottleneckAdapter", "FfnAdapterConfig", "adapter_path", "add_adapter",
           "build_adapter", "rule"]
