"""GPU training speed on nanoGPT's baby-GPT shape (6x384, context 256, batch 64, dropout 0.2, bf16).

    python bench/gpu_speed.py [--steps 50] [--run-steps 2000]

Prints tokens/s, and model FLOP/s as a share of the bf16 matmul peak measured in this same run, of:
a plain compiled PyTorch reference of the same shape (bench/speed.py's nn.TransformerEncoder
through torch.compile), charlm's GPT eager in the same tight loop, and charlm's real trainer
(data, evaluations every 250 steps, logging): eager, compiled in each ``train.compile_mode``, and
as shipped (``train.compile=auto``). A real run's tokens/s leave out its first step, which
compiles (shown apart, with the rate that counts it). The last line is what issue 15 asks for:
the shipped trainer's tokens/s, and its ratio to the compiled reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import VOCAB, BaselineTransformer  # noqa: E402

from charlm import config  # noqa: E402
from charlm.models import build_model  # noqa: E402
from charlm.optim import make_optimizer  # noqa: E402
from charlm.tracking import NullTracker  # noqa: E402
from charlm.trainer import train  # noqa: E402

SHAPE = ["model.kind=gpt", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.dropout=0.2",
         "data.context=256", "train.batch_size=64", "train.precision=bf16", "train.device=cuda", "train.lr=1e-3"]


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls, timed with CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def matmul_peak(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    timed(lambda: a @ b, 3)
    return 2 * n**3 / timed(lambda: a @ b, 10)


def tight_loop(cfg: config.Config, steps: int, compiled: bool, baseline: bool) -> float:
    """Tokens/s of training steps on random ids: no data loading, no evaluation."""
    torch.manual_seed(0)
    model = (BaselineTransformer(cfg) if baseline else build_model(cfg, VOCAB)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if baseline else make_optimizer(model, cfg)
    forward = torch.compile(model) if compiled else model
    B, T = cfg.train.batch_size, cfg.data.context
    x, y = (torch.randint(VOCAB, (B, T), device="cuda") for _ in range(2))

    def run():
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = forward(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    timed(run, 1)  # compile and warm up
    return B * T * steps / timed(run, 3)


def real_trainer(cfg: config.Config, steps: int, compile_setting: str, mode: str = "auto") -> tuple[float, float, float]:
    """charlm's trainer over ``steps`` (data, evaluations every 250 steps, logging): tokens/s after the
    first step (which compiles), tokens/s with it, and the compile seconds."""
    cfg = config.override(cfg, {"train.max_steps": steps, "train.compile": compile_setting, "train.compile_mode": mode,
                                "train.patience": 0, "train.validation_interval": 250, "train.system_metrics": False},
                          where="bench")
    tracker = NullTracker()
    res = train(cfg, tracker, progress=False)
    compile_s = tracker.metrics.get("compile_seconds", [(0, 0.0)])[0][1]
    tokens = cfg.train.batch_size * cfg.data.context
    steady = tokens * (res.steps - 1) / (res.train_seconds - compile_s) if compile_s else tokens * res.steps / res.train_seconds
    return steady, tokens * res.steps / res.train_seconds, compile_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="steps per tight-loop timing (default 50)")
    ap.add_argument("--run-steps", type=int, default=2000, help="steps of each real training run (default 2000)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/gpu_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = config.load(None, SHAPE)
    peak = matmul_peak()
    flops = build_model(cfg, VOCAB).flops_per_token(cfg.data.context)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; 6x384, context 256, "
          f"batch 64, bf16; real runs of {args.run_steps} steps, evaluations every 250\n")
    print("| what | tokens/s | model FLOP/s share of peak | with the first step (compile) | compile s |\n|---|---|---|---|---|")
    measure = {  # each row printed as it is measured: a run cut short keeps the rows before it
        "reference, plain PyTorch compiled (tight loop)": lambda: (tight_loop(cfg, args.steps, True, True), None, None),
        "charlm GPT eager (tight loop)": lambda: (tight_loop(cfg, args.steps, False, False), None, None),
        "charlm trainer eager (real run)": lambda: real_trainer(cfg, args.run_steps, "false"),
        "charlm trainer compiled, mode default (real run)": lambda: real_trainer(cfg, args.run_steps, "true", "default"),
        "charlm trainer compiled, CUDA graphs (real run)": lambda: real_trainer(cfg, args.run_steps, "true", "reduce-overhead"),
        "charlm trainer, train.compile=auto (real run)": lambda: real_trainer(cfg, args.run_steps, "auto"),
    }
    rates = {}
    for name, fn in measure.items():
        rate, whole, compile_s = rates[name] = fn()
        extra = f"{whole / 1e6:.2f}M | {compile_s:.1f}" if whole is not None else "- | -"
        print(f"| {name} | {rate / 1e6:.2f}M | {rate * flops / peak:.1%} | {extra} |", flush=True)
    reference = rates["reference, plain PyTorch compiled (tight loop)"][0]
    auto = rates["charlm trainer, train.compile=auto (real run)"][0]
    print(f"\nreal trainer (auto) {auto / 1e6:.2f}M tokens/s; over the compiled reference: {auto / reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
