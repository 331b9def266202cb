"""What an evaluation writes, and what it costs, for the model shapes the shipped studies train.

    python bench/save_cost.py [--repeats 3]

A sweep's trial and a `best` seed save their whole training state at every evaluation (for an
exact resume), and that time is on the trial's clock. Per shape, in one run on this disk, median
seconds and MB of:

- before: what every such evaluation wrote until now: the best checkpoint (fsync) and the state
  with the best weights held apart from the model's (fsync);
- shipped, at a new best: ``Loop.persist`` of charlm/loop.py: the state alone, the best weights
  being the model's, no fsync;
- shipped, past the best: the same, the best weights held apart.

On a GPU an evaluation's training stretch is short (250 steps of nanoGPT's baby GPT took 1.5 s on
an H200), so these seconds are a large share of a trial's clock; on 2 CPU cores it is minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charlm import checkpoint, config  # noqa: E402
from charlm.loop import Loop  # noqa: E402
from charlm.tracking import NullTracker  # noqa: E402
from charlm.trainer import resume, setup  # noqa: E402

SHAPES = {  # name: overrides of experiments/gpt.yaml (batch 1: a batch's size writes nothing)
    "default GPT (CPU)": [],
    "gpu.yaml smallest 4x384": ["model.n_layer=4", "model.n_embd=384", "model.n_head=8", "data.context=256"],
    "baby GPT 6x384": ["model.n_layer=6", "model.n_embd=384", "model.n_head=6", "data.context=256"],
    "gpu.yaml largest 8x768": ["model.n_layer=8", "model.n_embd=768", "model.n_head=8", "data.context=512"],
}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def before(loop: Loop, path: Path) -> None:
    """The previous scheme, from the same objects: checkpoint, then the state with the best apart, each fsync'd."""
    run, state = loop.run, loop.state
    run.save_checkpoint({"step": state.step, "slice_val_loss": state.stop.best})
    blob = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "loop": {"best_state": state.best_state}, "batch_rng": run.batches.gen.get_state()}
    checkpoint.write_atomic(path, lambda f: torch.save(blob, f))


def measure(name: str, overrides: list[str], folder: Path, repeats: int) -> None:
    cfg = config.load("experiments/gpt.yaml", [*overrides, "train.batch_size=1", "train.device=cpu",
                                               "train.compile=false", "train.precision=fp32"])
    run = setup(cfg, NullTracker(folder / "run"), None)
    state_path = folder / "state.pt"
    loop = Loop(run, resume(run, None), None, state_path)
    loop.step(cfg.train.lr)  # the optimizer's moments exist from the first step on
    state = loop.state
    state.stop.update(state.step, 2.0)
    state.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    rows = [("before", timed(lambda: before(loop, folder / "old-state.pt"), repeats),
             run.ckpt_path.stat().st_size + (folder / "old-state.pt").stat().st_size)]
    rows.append(("shipped, new best", timed(loop.persist, repeats), state_path.stat().st_size))
    state.step += 1  # past the best: the best weights are written apart
    rows.append(("shipped, past best", timed(loop.persist, repeats), state_path.stat().st_size))
    base = rows[0][1]
    for what, seconds, size in rows:
        print(f"{name:<26}{run.n_params / 1e6:>8.1f}M  {what:<20}{size / 1e6:>8.0f} MB{seconds:>9.3f} s"
              f"{base / seconds:>9.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timings per row; the median is shown (default 3)")
    args = ap.parse_args()
    print(f"{'shape':<26}{'params':>9}  {'what an evaluation writes':<20}{'size':>11}{'median':>11}{'speedup':>9}")
    for name, overrides in SHAPES.items():
        with tempfile.TemporaryDirectory(prefix="charlm-save-", dir=Path(__file__).resolve().parent.parent) as d:
            measure(name, overrides, Path(d), args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
