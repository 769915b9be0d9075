"""``PipelineSpec``: what the driver, CLI, tests and benchmarks need to know about a stand-in.

Every stand-in module exports ``PIPELINE = PipelineSpec(...)``. The spec builds the model
the way the generator wrapper does (spec 8.1: constructor kwargs filtered by signature),
applies the run-time attribute mutations of the pipeline stages (spec 7) and allocates
the cache dicts (spec 1.13).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from .model import build_freqs

__all__ = [
    "GENERATOR_SEQ_LEN",
    "MODEL_SIZES",
    "PipelineConfig",
    "PipelineSpec",
    "filter_model_kwargs",
    "frame_seq_length",
]

# The generator's ``seq_len`` whenever local_attn_size <= 21, i.e. always in practice (8.1).
GENERATOR_SEQ_LEN = 32760

_PATCH = (1, 2, 2)
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, text_len=16, freq_dim=32,
                 in_dim=16, out_dim=16, patch_size=_PATCH, model_type="t2v"),
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, text_len=512, freq_dim=256,
                 in_dim=16, out_dim=16, patch_size=_PATCH, model_type="t2v"),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, text_len=512, freq_dim=256,
                in_dim=16, out_dim=16, patch_size=_PATCH, model_type="t2v"),
}
INITS = ("random", "zeros", "meta")


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline's yaml facts (spec sections 2-6 and 9)."""

    base_model: str  # "1.3B" or "14B"
    num_frame_per_block: int
    local_attn_size: int  # the yaml value, applied at run time (spec 7)
    sink_size: int  # effective sink in frames (SDv2: the hard-coded 3)
    steps: tuple[int, ...]  # denoising step list
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # base_model_kwargs the wrapper forwards
    sets_block_local_attn_size: bool = False  # has SetTransformerBlocksLocalAttnSizeBlock
    kv_cache_attention_bias: float = 1.0  # what DenoiseBlock passes
    timestep_shift: float = 5.0
    height: int = 320
    width: int = 576
    bank_size: Optional[int] = None  # MemFlow memory bank, in frames
    record_interval: Optional[int] = None
    vace_layers: Optional[tuple[int, ...]] = None  # None: every second layer
    vace_in_dim: int = 96
    builtin_lora: bool = False


def frame_seq_length(height: int, width: int) -> int:
    """Tokens per latent frame for a pixel size (VAE factor 8 times patch factor 2)."""
    return (height // 16) * (width // 16)


def filter_model_kwargs(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls.__init__`` accepts, silently dropping the rest (upstream's filter)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


@dataclass(frozen=True)
class PipelineSpec:
    """One stand-in pipeline: its module, yaml facts, call convention and setup stage.

    ``call_keywords`` is the keyword set the generator's signature filter lets through to
    the base model (spec 8.3), in the generator's order. ``extra_setup(model, height,
    width, local_attn_size)`` runs after the shared setup mutations, for pipeline-only ones.
    """

    name: str
    module: ModuleType
    config: PipelineConfig
    call_keywords: tuple[str, ...]
    extra_setup: Optional[Callable[[nn.Module, int, int, int], None]] = None

    @property
    def model_class(self) -> type:
        return self.module.CausalWanModel

    def build(
        self,
        size: str = "tiny",
        seed: int = 0,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        init: str = "random",
    ) -> nn.Module:
        """Build ``CausalWanModel`` at ``size`` ("tiny", "1.3B", "14B").

        ``init``: "random" (seeded upstream init, then a random ``head.head.weight`` so the
        output is not all zeros), "zeros" (allocated, all zeros; fast at real sizes) or
        "meta" (parameters on the meta device; ``freqs`` rebuilt on CPU as the generator does).
        """
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown size {size!r}; use one of {sorted(MODEL_SIZES)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; use one of {INITS}")
        # The wrapper updates config.json with its local_attn_size (-1) and sink_size, then
        # the base_model_kwargs, and drops what the class does not accept (spec 8.1).
        config = {**MODEL_SIZES[size], "local_attn_size": -1, "sink_size": 0, **self.config.model_kwargs}
        kwargs = filter_model_kwargs(self.model_class, config)
        if init == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.model_class(**kwargs)
                nn.init.xavier_uniform_(model.head.head.weight)
            return model.to(device=device, dtype=dtype)
        with torch.device("meta"):
            model = self.model_class(**kwargs)
        model = model.to(dtype=dtype)
        if init == "zeros":
            model = model.to_empty(device=device)
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    tensor.zero_()
        # The meta build leaves freqs unusable; the generator rebuilds it on CPU (its "hack").
        model.freqs = build_freqs(model.dim, model.num_heads)
        return model

    def configure(self, model: nn.Module, height: int, width: int, local_attn_size: Optional[int] = None) -> int:
        """Apply the run-time attribute mutations of spec 7; returns the frame length."""
        fs = frame_seq_length(height, width)
        las = self.config.local_attn_size if local_attn_size is None else local_attn_size
        # SetupCachesBlock
        for block in model.blocks:
            block.self_attn.local_attn_size = -1
            block.self_attn.num_frame_per_block = self.config.num_frame_per_block
        model.local_attn_size = las
        for module in model.modules():
            if hasattr(module, "frame_seq_length"):
                module.frame_seq_length = fs
        for module in model.modules():
            if hasattr(module, "max_attention_size"):
                module.max_attention_size = las * fs
        # SetTransformerBlocksLocalAttnSizeBlock (LongLive, RewardForcing, MemFlow only)
        if self.config.sets_block_local_attn_size:
            for block in model.blocks:
                block.self_attn.local_attn_size = las
        if self.extra_setup is not None:
            self.extra_setup(model, height, width, las)
        return fs

    def init_caches(
        self,
        model: nn.Module,
        height: int,
        width: int,
        local_attn_size: Optional[int] = None,
        batch_size: int = 1,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        index_device: Any = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Fresh caches (spec 1.13): ``kv_cache``, ``crossattn_cache`` and, with a bank, ``kv_bank``.

        k/v follow the model's device and dtype unless given; the index tensors live on
        ``index_device`` (default: the k/v device, or CPU when that is ``meta``).
        """
        weight = model.patch_embedding.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if index_device is None:
            index_device = torch.device("cpu") if device.type == "meta" else device
        fs = frame_seq_length(height, width)
        las = self.config.local_attn_size if local_attn_size is None else local_attn_size
        n = model.num_heads
        d = model.dim // n
        num_blocks = len(model.blocks)
        kv_size = las * fs if las != -1 else GENERATOR_SEQ_LEN

        def zeros(length: int) -> torch.Tensor:
            return torch.zeros([batch_size, length, n, d], dtype=dtype, device=device)

        def index() -> torch.Tensor:
            return torch.tensor([0], dtype=torch.long, device=index_device)

        caches: dict[str, list[dict[str, Any]]] = {
            "kv_cache": [
                {"k": zeros(kv_size), "v": zeros(kv_size), "global_end_index": index(), "local_end_index": index()}
                for _ in range(num_blocks)
            ],
            "crossattn_cache": [
                {"k": zeros(model.text_len), "v": zeros(model.text_len), "is_init": False} for _ in range(num_blocks)
            ],
        }
        if self.config.bank_size is not None:
            caches["kv_bank"] = [
                {
                    "k": zeros(self.config.bank_size * fs),
                    "v": zeros(self.config.bank_size * fs),
                    "k_new": zeros(fs),
                    "v_new": zeros(fs),
                    "global_end_index": index(),
                    "local_end_index": index(),
                }
                for _ in range(num_blocks)
            ]
        return caches

    def setup(
        self,
        model: nn.Module,
        height: int,
        width: int,
        local_attn_size: Optional[int] = None,
        batch_size: int = 1,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        index_device: Any = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """``configure`` then ``init_caches``: what the pipeline's setup stages do."""
        self.configure(model, height, width, local_attn_size)
        return self.init_caches(model, height, width, local_attn_size, batch_size, device, dtype, index_device)

    def generator_seq_len(self, height: int, width: int, local_attn_size: Optional[int] = None) -> int:
        """The ``seq_len`` the generator passes (spec 8.1): 32760 unless local_attn_size > 21."""
        las = self.config.local_attn_size if local_attn_size is None else local_attn_size
        return frame_seq_length(height, width) * las if las > 21 else GENERATOR_SEQ_LEN
