"""Which device a command runs on: --device auto picks CUDA when present, else the CPU."""
from __future__ import annotations

import torch

from runtime.errors import InputError


def resolve_device(name: str = "auto", gpuid: int = 0) -> torch.device:
    """auto picks CUDA when present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", gpuid)
    return torch.device("cpu")
