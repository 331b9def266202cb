"""Where a run computes, in what precision, compiled or not, and how workers share GPUs."""

from __future__ import annotations

import os

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


# auto compiles a CUDA run only when its budget allows at least this many steps and minutes: on an
# H200 a compile took 11 s (18 s with 4 workers compiling at once) and saved 8.3 ms a step, repaid
# after ~1,300 steps; a compiled minute then still trains ~1.7x the steps of an eager one (docs/results.md, One GPU)
COMPILE_PAYS_STEPS = 2000
COMPILE_PAYS_MINUTES = 1.0


def compile_for(setting: str, device: str, max_steps: int, max_minutes: float) -> bool:
    """``train.compile``: auto compiles on CUDA, where fusing the step's kernels pays, for a run
    long enough to win back the compile; on CPU the step stays eager unless asked (measured no
    faster there, docs/results.md)."""
    if setting != "auto":
        return setting == "true"
    long_enough = max_steps >= COMPILE_PAYS_STEPS and (max_minutes == 0 or max_minutes >= COMPILE_PAYS_MINUTES)
    return device == "cuda" and long_enough


def compile_mode_for(setting: str, device: str) -> str:
    """``train.compile_mode``: auto replays the compiled step as CUDA graphs on CUDA, where a small
    model's step is bound by launching its kernels, not by running them (bench/gpu_speed.py measures
    both); CPU has no CUDA graphs."""
    if setting == "auto":
        return "reduce-overhead" if device == "cuda" else "default"
    return setting


def autocast_for(precision: str, device: str) -> torch.autocast | None:
    """bf16 autocast when asked, or on ``auto`` where the hardware computes bf16 natively."""
    use = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if use else None


GPU_WORKERS = "CHARLM_GPU_WORKERS"  # set by `sweep --workers` on each worker: how many share its GPU
MEMORY_MARGIN = 0.9  # of a GPU's memory for the workers' tensors; the rest holds each one's CUDA context


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (ids or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:  # CUDA reads up to the first entry that is not a device
        gpus = []
        for d in (d.strip() for d in listed.split(",")):
            if not d or d.startswith("-"):
                break
            gpus.append(d)
        return gpus
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_env(index: int, workers: int, gpus: list[str]) -> dict[str, str]:
    """Worker ``index``'s GPU, round-robin over ``gpus``, and how many workers share that GPU."""
    if not gpus:
        return {}
    slot = index % len(gpus)
    return {"CUDA_VISIBLE_DEVICES": gpus[slot], GPU_WORKERS: str(len(range(slot, workers, len(gpus))))}


def _sharing() -> int:
    """How many workers share this process's GPU (1 outside a multi-worker sweep)."""
    return int(os.environ.get(GPU_WORKERS, "1"))


def guard_memory(device: str) -> float | None:
    """A worker sharing its GPU with others may use its share of the memory, so one whose model does
    not fit fails its own trial (out of memory, with :func:`explain`) instead of the others'."""
    sharing = _sharing()
    if device != "cuda" or sharing <= 1:
        return None
    fraction = MEMORY_MARGIN / sharing
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def explain(e: Exception) -> str:
    """A trial's failure as one line; running out of a shared GPU's memory says what to change."""
    message = f"{type(e).__name__}: {e}"
    sharing = _sharing()
    if isinstance(e, torch.OutOfMemoryError) and sharing > 1:
        return (f"out of GPU memory: this worker may use {MEMORY_MARGIN / sharing:.0%} of a GPU it shares "
                f"with {sharing - 1} other worker(s); run fewer --workers or a smaller model ({message})")
    return message
