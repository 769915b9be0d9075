"""Shared Wan2.1 stand-in helpers: attention kernels, model pieces, config mixins, ``PipelineSpec``."""
