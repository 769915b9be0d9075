"""The five causal Wan stand-ins and the shared streaming tools.

``PIPELINES`` maps a pipeline name to its ``PipelineSpec``. Modules are imported on first
access, so a pipeline whose module is missing or broken only fails when it is asked for.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from examples.wan.pipeline import PipelineSpec

__all__ = ["MODEL_SIZES", "PIPELINES", "PIPELINE_MODULES", "get_pipeline"]

PIPELINE_MODULES: dict[str, str] = {
    "longlive": "examples.longlive",
    "streamdiffusionv2": "examples.streamdiffusionv2",
    "krea_realtime_video": "examples.krea_realtime_video",
    "reward_forcing": "examples.reward_forcing",
    "memflow": "examples.memflow",
}


def get_pipeline(name: str) -> "PipelineSpec":
    """Import the stand-in module for ``name`` and return its ``PIPELINE``."""
    if name not in PIPELINE_MODULES:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINE_MODULES)}")
    return importlib.import_module(PIPELINE_MODULES[name]).PIPELINE


class _LazyPipelines(Mapping):
    """A read-only ``dict[str, PipelineSpec]`` that imports each module on first access."""

    def __getitem__(self, name: str) -> "PipelineSpec":
        return get_pipeline(name)

    def __iter__(self) -> Iterator[str]:
        return iter(PIPELINE_MODULES)

    def __len__(self) -> int:
        return len(PIPELINE_MODULES)

    def __repr__(self) -> str:
        return f"PIPELINES({', '.join(PIPELINE_MODULES)})"


PIPELINES: Mapping[str, "PipelineSpec"] = _LazyPipelines()


def __getattr__(name: str) -> object:
    # MODEL_SIZES (size name -> settings) imports the model code only when asked for.
    if name == "MODEL_SIZES":
        return importlib.import_module("examples.wan.pipeline").MODEL_SIZES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
