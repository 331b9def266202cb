"""Where a run computes and in what precision."""

from __future__ import annotations

import torch

from charlm.errors import CharlmError


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CharlmError("train.device=cuda but torch sees no GPU; use train.device=auto or cpu")
    return name


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(precision: str, device: str) -> torch.autocast | None:
    """bf16 autocast when asked, or on ``auto`` where the hardware computes bf16 natively."""
    use = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if use else None
