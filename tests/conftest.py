"""Test-wide settings: tiny models run fastest single-threaded (no thread hand-off per op)."""

import torch
import transformers

from tokensieve.runtime import compat

torch.set_num_threads(1)


def pytest_report_header(config):
    return (f"transformers {transformers.__version__} (tokensieve supports {compat.supported_range()}), "
            f"torch {torch.__version__}")
