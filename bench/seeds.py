"""The whole search judged over sampler seeds, not one draw: `make all` per seed, and the search gain.

    python bench/seeds.py [--budget 45m] [--seeds 0 1 2] [--sweep sweeps/default.yaml] [--text FILE]

For each sampler seed, in a fresh folder (its own mlruns/): ``sweep --budget B --seed S`` then
``best --budget B``, exactly what ``make all BUDGET=B SEED=S`` runs, timed from the first command's
start to the second's end. Then the base experiment's own trial (the study's first, queued by
``study.enqueue_base``) is retrained the same way, at the winner's clock, with the same seeds
(``best --trial N --minutes M``; outside the budget, not registered): the **search gain** is the
base's retrained test loss minus the winner's. Where the winner is the base itself the gain is 0
by construction and no retrain runs. A gain is counted as real only above the seed noise (twice
the larger spread of the two retrains over their seeds, and at least ``NOISE_FLOOR``: one seed
measures no spread).

Prints one Markdown table (and writes it to OUT/seeds.md): per seed the winning trial and whether
it was queued, its val, test mixed and alone, the wall time against the budget, the base's test
and the gain; then the median and the worst.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charlm.plan import parse_duration  # noqa: E402


def charlm(args: list[str], cwd: Path, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ python -m charlm {' '.join(args)}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "charlm", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=True)


def metrics(folder: Path) -> dict:
    found = sorted(folder.glob("mlruns/best/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())


def base_trial(folder: Path, study: str) -> int | None:
    import optuna

    from charlm.storage import open_storage

    s = optuna.load_study(study_name=study, storage=open_storage(f"journal:{folder}/mlruns/optuna/{study}.journal"))
    return next((t.number for t in s.trials if t.user_attrs.get("charlm.enqueued") == "base"), None)


# one retrain seed measures no spread: the floor is twice the two-seed spread of a 6-minute retrain
# on this machine (std 0.003 mixed, docs/REPORT.md section 8)
NOISE_FLOOR = 0.006


def one_seed(seed: int, args, out: Path) -> dict:
    folder = out / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=False)
    log = folder / "log.txt"
    sweep = str(Path(args.sweep).resolve())
    text = ["--text", str(Path(args.text).resolve())] if args.text else []
    t0 = time.time()
    charlm(["sweep", sweep, "--budget", args.budget, "--seed", str(seed), *text], folder, log)
    charlm(["best", sweep, "--budget", args.budget, *text], folder, log)
    wall = time.time() - t0
    won = metrics(folder)
    row = {"seed": seed, "trial": won["trial"], "enqueued": won.get("enqueued", ""), "val": won["trial_val_loss"],
           "test": won["test_loss_mean"], "test_std": won["test_loss_std"],
           "alone": won.get("network_test_loss_mean", float("nan")), "wall_s": wall,
           "kind": won.get("params", {}).get("model.kind", "?")}
    base = base_trial(folder, won["study"])
    if base is None:
        row.update(base_test=float("nan"), gain=float("nan"), noise=float("nan"))
    elif base == won["trial"]:
        row.update(base_test=won["test_loss_mean"], gain=0.0, noise=2 * won["test_loss_std"])
    else:
        clock = statistics.fmean(r["clock_minutes"] for r in won["runs"])
        charlm(["best", sweep, *text, "--trial", str(base), "--minutes", f"{clock:.4f}",
                "--seeds", *map(str, won["seeds"])], folder, log)
        b = json.loads((folder / "mlruns" / "best" / f"{won['study']}-trial-{base}" / "metrics.json").read_text())
        row.update(base_test=b["test_loss_mean"], gain=b["test_loss_mean"] - won["test_loss_mean"],
                   noise=2 * max(b["test_loss_std"], won["test_loss_std"]))
    return row


def table(rows: list[dict], budget_s: float) -> str:
    lines = ["| seed | winner | queued? | val (slice) | test mixed | test alone | wall | base test mixed | search gain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['trial']} ({r['kind']}) | {r['enqueued'] or 'no'} | {r['val']:.4f} | "
                     f"{r['test']:.4f} +- {r['test_std']:.4f} | {r['alone']:.4f} | {r['wall_s'] / 60:.1f} min "
                     f"({r['wall_s'] / budget_s:.1%}) | {r['base_test']:.4f} | {r['gain']:+.4f} |")
    med = {k: statistics.median(r[k] for r in rows) for k in ("val", "test", "alone", "wall_s", "gain")}
    worst = max(rows, key=lambda r: r["test"])
    lines.append(f"| median | | | {med['val']:.4f} | {med['test']:.4f} | {med['alone']:.4f} | "
                 f"{med['wall_s'] / 60:.1f} min | | {med['gain']:+.4f} |")
    lines.append(f"| worst | seed {worst['seed']} | | {worst['val']:.4f} | {worst['test']:.4f} | {worst['alone']:.4f} | "
                 f"{max(r['wall_s'] for r in rows) / 60:.1f} min | | {min(r['gain'] for r in rows):+.4f} |")
    noise = max(NOISE_FLOOR, statistics.median(r["noise"] for r in rows))
    verdict = ("the search earned its time: its median gain is above the seed noise"
               if med["gain"] > noise else "the search did NOT earn its time: its median gain is within the seed noise")
    lines.append(f"\nsearch gain = the base experiment's retrained test loss minus the winner's (same clock, seeds, "
                 f"split and mixture); seed noise (twice the larger retrain spread, median, at least {NOISE_FLOOR}) "
                 f"{noise:.4f}: {verdict}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="45m", help="each seed's `make all` budget (default 45m)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "default.yaml"))
    ap.add_argument("--text", default=None, help="the user's own text (make all TEXT=)")
    ap.add_argument("--out", default=None, help="folder for the runs (default mlruns/bench-seeds/<budget>-<time>)")
    args = ap.parse_args()
    budget_s = parse_duration(args.budget)
    out = Path(args.out or ROOT / "mlruns" / "bench-seeds" / f"{args.budget}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(seed, args, out))
        r = rows[-1]
        print(f"seed {seed}: trial {r['trial']} test {r['test']:.4f} alone {r['alone']:.4f} in {r['wall_s'] / 60:.1f} "
              f"min; gain {r['gain']:+.4f}", file=sys.stderr, flush=True)
    text = f"`make all BUDGET={args.budget}` over sampler seeds {args.seeds} ({Path(args.sweep).name})\n\n" + table(
        rows, budget_s)
    (out / "seeds.md").write_text(text + "\n")
    (out / "seeds.json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
