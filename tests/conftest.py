"""Test-wide settings.

Tiny models run faster on one thread: two threads fight over microsecond-sized ops on the
2-core CI machine. Results are bit-identical either way (each op is deterministic on CPU).
"""
import torch

torch.set_num_threads(1)
