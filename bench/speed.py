"""Training speed of the shipped configs against the machine's own matmul peak, in one run.

    python bench/speed.py [--steps 10] [--run-steps 300] [--configs experiments/gpt.yaml ...] [--set model.n_embd=192]

Prints, for each config in fp32 and bf16: training tokens/s, model FLOP/s (6N + attention per
token) and that as a fraction of the matmul peak measured for the same dtype in this same run;
for GPT configs also a plain fp32 nn.TransformerEncoder of the same shape and the speed ratio;
then a real short training run per config: the share of time spent evaluating and peak memory.
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
from charlm.optim import make_optimizer  # noqa: E402

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


class BaselineTransformer(torch.nn.Module):
    """What a plain PyTorch user would write: nn.TransformerEncoder with a causal mask, fp32."""

    def __init__(self, cfg: config.Config):
        super().__init__()
        m = cfg.model
        self.tok = torch.nn.Embedding(VOCAB, m.n_embd)
        self.pos = torch.nn.Embedding(cfg.data.context, m.n_embd)
        layer = torch.nn.TransformerEncoderLayer(m.n_embd, m.n_head, 4 * m.n_embd, dropout=m.dropout,
                                                 activation="gelu", batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, m.n_layer, enable_nested_tensor=False)
        self.ln = torch.nn.LayerNorm(m.n_embd)
        self.head = torch.nn.Linear(m.n_embd, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(cfg.data.context))

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        x = self.encoder(x, mask=self.mask[:T, :T], is_causal=True)
        logits = self.head(self.ln(x))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def train_speed(cfg: config.Config, bf16: bool, steps: int, repeats: int = 3, baseline: bool = False) -> float:
    """Median tokens/s of full training steps (forward, backward, clip, AdamW) on random ids."""
    torch.manual_seed(0)
    if baseline:
        model = BaselineTransformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    else:
        model = build_model(cfg, VOCAB)
        opt = make_optimizer(model, cfg)
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


RUN = """
import json, resource, sys
from charlm import config
from charlm.tracking import NullTracker
from charlm.trainer import train
cfg = config.load(sys.argv[1], sys.argv[3:] + [f"train.max_steps={sys.argv[2]}", "train.patience=0"])
r = train(cfg, NullTracker())
print(json.dumps({"steps": r.steps, "train_seconds": r.train_seconds, "eval_seconds": r.eval_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_measured(path: str, steps: int, overrides: list[str]) -> dict:
    """A real training run (intermediate evaluations included) in a child process: eval share
    of the training loop's time, and the child's peak resident memory."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", RUN, path, str(steps), *overrides], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["eval_share"] = r["eval_seconds"] / r["train_seconds"]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="training steps per timing (default 10)")
    ap.add_argument("--configs", nargs="+", default=["experiments/gpt.yaml", "experiments/ff.yaml"])
    ap.add_argument("--run-steps", type=int, default=300, help="steps of the measured real run (default 300)")
    ap.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys in every config, e.g. --set model.n_embd=192 model.n_layer=6")
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
    speeds: dict[tuple[str, str], float] = {}
    for path in args.configs:
        cfg = config.load(path, args.set)
        model = build_model(cfg, VOCAB)
        n = count_params(model)
        fpt = model.flops_per_token(cfg.data.context)
        rows = [("fp32", False), ("bf16", False)] + ([("fp32", True)] if cfg.model.kind == "gpt" else [])
        for prec, baseline in rows:
            if baseline:
                n = sum(p.numel() for p in BaselineTransformer(cfg).parameters())  # its own count
            tps = train_speed(cfg, prec == "bf16", args.steps, baseline=baseline)
            speeds[(path, prec + ("-baseline" if baseline else ""))] = tps
            flops = tps * fpt
            name = Path(path).name + (" nn.Transformer" if baseline else "")
            ratio = "" if prec == "fp32" else f"{tps / speeds[(path, 'fp32')]:.2f}x"
            print(f"{name:<24}{n:>10,}{prec:>6}{tps:>11,.0f}{flops / 1e9:>9.1f}"
                  f"{flops / peak[prec]:>9.1%}{ratio:>11}")
    print()
    for path in args.configs:
        if (path, "fp32-baseline") not in speeds:
            continue
        cfg = config.load(path, args.set)
        from charlm.device import bf16_supported

        prec = "bf16" if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and bf16_supported("cpu")) else "fp32"
        ratio = speeds[(path, prec)] / speeds[(path, "fp32-baseline")]
        print(f"{Path(path).name}: charlm as configured ({prec}) vs plain fp32 nn.TransformerEncoder "
              f"of the same shape: {ratio:.2f}x tokens/s")
    print()
    print(f"{'config':<24}{'steps':>7}{'train s':>9}{'eval s':>8}{'eval share':>12}{'peak RSS':>11}")
    for path in args.configs:
        r = run_measured(path, args.run_steps, args.set)
        print(f"{Path(path).name:<24}{r['steps']:>7}{r['train_seconds']:>9.1f}{r['eval_seconds']:>8.1f}"
              f"{r['eval_share']:>12.1%}{r['peak_rss_mb']:>8.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
