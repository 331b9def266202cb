"""Training speed of the shipped configs against the machine's own matmul peak, in one run.

    python bench/speed.py [--steps 20] [--configs experiments/gpt.yaml experiments/ff.yaml]

Prints, for each config in fp32 and bf16: training tokens/s, model FLOP/s (6N + attention per
token) and that as a fraction of the matmul peak measured for the same dtype in this same run.
Figures are medians over repeated timings; the machine is noisy, so compare the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charlm import config  # noqa: E402
from charlm.models import build_model, count_params  # noqa: E402
from charlm.train import make_optimizer  # noqa: E402

VOCAB = 65  # tiny shakespeare's; speed does not depend on the text


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an n x n matmul in ``dtype``."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def train_speed(cfg: config.Config, bf16: bool, steps: int, repeats: int = 3) -> float:
    """Median tokens/s of full training steps (forward, backward, clip, AdamW) on random ids."""
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    opt = make_optimizer(model, cfg, "cpu")
    B, T = cfg.train.batch_size, cfg.data.context
    x = torch.randint(VOCAB, (B, T))
    y = torch.randint(VOCAB, (B, T))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with amp:
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):  # warm up allocator and kernels
        step()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(B * T * steps / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="training steps per timing (default 10)")
    ap.add_argument("--configs", nargs="+", default=["experiments/gpt.yaml", "experiments/ff.yaml"])
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3, median of 5): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print()
    header = f"{'config':<24}{'params':>10}{'prec':>6}{'tokens/s':>11}{'GFLOP/s':>9}{'of peak':>9}{'bf16/fp32':>11}"
    print(header)
    print("-" * len(header))
    for path in args.configs:
        cfg = config.load(path)
        model = build_model(cfg, VOCAB)
        n = count_params(model)
        fpt = model.flops_per_token(cfg.data.context)
        base = None
        for prec in ("fp32", "bf16"):
            tps = train_speed(cfg, prec == "bf16", args.steps)
            flops = tps * fpt
            ratio = "" if base is None else f"{tps / base:.2f}x"
            base = base or tps
            print(f"{Path(path).name:<24}{n:>10,}{prec:>6}{tps:>11,.0f}{flops / 1e9:>9.1f}"
                  f"{flops / peak[prec]:>9.1%}{ratio:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
