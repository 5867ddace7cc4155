"""Test-wide settings: tiny models run fastest single-threaded (no thread hand-off per op)."""

import torch

torch.set_num_threads(1)
