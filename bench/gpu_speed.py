"""GPU training speed on nanoGPT's baby-GPT shape (6x384, context 256, batch 64, dropout 0.2, bf16).

    python bench/gpu_speed.py [--steps 50] [--run-steps 1000]

Prints tokens/s, and model FLOP/s as a share of the bf16 matmul peak measured in this same run, of:
a plain compiled PyTorch reference of the same shape (bench/speed.py's nn.TransformerEncoder
through torch.compile), charlm's GPT in the same tight loop (eager and compiled), and charlm's
real trainer (data, evaluations every 250 steps, logging; eager and ``train.compile=auto``).
The last line is the ratio issue 15 asks for: the real compiled trainer over the reference.
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
from charlm.train import train  # noqa: E402

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


def real_trainer(cfg: config.Config, steps: int, compile_setting: str) -> float:
    """Tokens/s of charlm's trainer over ``steps`` (its clock includes evaluations and compiling)."""
    t = cfg.train
    cfg = config.override(cfg, {"train.max_steps": steps, "train.compile": compile_setting, "train.patience": 0,
                                "train.validation_interval": 250, "train.system_metrics": False}, where="bench")
    res = train(cfg, NullTracker(), progress=False)
    return t.batch_size * cfg.data.context * res.steps / res.train_seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="steps per tight-loop timing (default 50)")
    ap.add_argument("--run-steps", type=int, default=1000, help="steps of each real training run (default 1000)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/gpu_speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = config.load(None, SHAPE)
    peak = matmul_peak()
    flops = build_model(cfg, VOCAB).flops_per_token(cfg.data.context)
    rows = {
        "reference, plain PyTorch compiled (tight loop)": tight_loop(cfg, args.steps, True, True),
        "charlm GPT eager (tight loop)": tight_loop(cfg, args.steps, False, False),
        "charlm GPT compiled (tight loop)": tight_loop(cfg, args.steps, True, False),
        "charlm trainer eager (real run)": real_trainer(cfg, args.run_steps, "false"),
        "charlm trainer compiled (real run)": real_trainer(cfg, args.run_steps, "auto"),
    }
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; 6x384, context 256, batch 64\n")
    print("| what | tokens/s | model FLOP/s share of peak |\n|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate / 1e6:.2f}M | {rate * flops / peak:.1%} |")
    reference = rows["reference, plain PyTorch compiled (tight loop)"]
    print(f"\nreal compiled trainer / compiled reference: {rows['charlm trainer compiled (real run)'] / reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
