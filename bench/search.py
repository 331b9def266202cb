"""Head-to-head of three search schemes on the same space and the same wall-clock budget.

    python bench/search.py [--minutes 12] [--workers 2] [--sweep sweeps/default.yaml] [--seeds 0 1]
                           [--schemes asha hyperband] [--keep DIR]

Each scheme runs `python -m charlm sweep` in a fresh folder for ``--minutes`` (study.timeout_min;
trials under way then finish), with the sweep file's space, base and fixed settings (its schedule
included), written in the file's own key order so the sampler draws the same trials as the study
does; only the pruner and the trial clock differ:

(a) asha: promotion with continued training; top rung = minutes / 3 of training, three rungs by
    3 (top / 9, top / 3, top), in the sweep file's ``pruner.brackets``, else one: on val, seed 0 at
    this 4-minute clock on a 2-core AVX2 machine, three brackets (the plan's rule, one per rung) ended
    at 1.7218 against one's 1.5234, two unjudged trials of slow configurations taking 8 of its 25
    minutes of compute (docs/REPORT.md section 8);
(b) patience: today's fixed budget, every trial minutes / 6 of training, the patience pruner;
(c) hyperband: Optuna's HyperbandPruner on the same compute axis, every trial minutes / 3, its
    max_resource the clock (what a trial can really reach).

It prints one Markdown table per sampler seed (``--seeds``: each scheme draws its trials from that
seed): best val found (the study's value: the val slice), that trial's test loss (a full pass),
trials started, compute used (training seconds of every trial, asha's rung-end previews
included), the compute saved against running every started trial to the top budget, and the
compute used until a trial first reached the best val Hyperband found with the same seed (trials
in the order they finished; "-": never). Then the medians over the seeds. ``--keep DIR`` keeps each
scheme's folder (its Optuna journal and MLflow store) under DIR; without it they are deleted.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charlm.storage import open_storage  # noqa: E402

SCHEMES = ("asha", "patience", "hyperband")


def scheme_docs(base_doc: dict, minutes: float, seed: int = 0) -> dict[str, tuple[dict, float]]:
    """Sweep documents of the three schemes, each with the top training budget in seconds."""
    top = minutes / 3
    schemes = {
        "asha": ({"type": "asha", "min_seconds": top * 60 / 9, "reduction_factor": 3,
                  "brackets": base_doc.get("pruner", {}).get("brackets", 1)}, top),
        "patience": ({"type": "patience", "reference": "median", "min_trials": 3, "warmup_seconds": minutes * 60 / 36},
                     minutes / 6),
        "hyperband": ({"type": "hyperband"}, top),
    }
    docs = {}
    for name, (pruner, clock) in schemes.items():
        doc = copy.deepcopy(base_doc)
        doc["study"] = {**doc["study"], "name": f"search-{name}", "n_trials": 1000, "timeout_min": minutes}
        doc["study"].pop("budget", None)  # the schemes share a hand-made clock, not a plan
        doc["sampler"] = {**doc.get("sampler", {}), "seed": seed}
        doc["pruner"] = pruner
        doc["fixed"] = {**doc.get("fixed", {}), "train.max_minutes": clock}
        doc["base"] = str((ROOT / doc["base"]).resolve()) if not Path(doc["base"]).is_absolute() else doc["base"]
        doc.pop("baseline", None)
        docs[name] = (doc, clock * 60)
    return docs


def run_scheme(name: str, doc: dict, top_seconds: float, workers: int, folder: Path) -> dict:
    sweep = folder / f"{name}.yaml"
    sweep.write_text(yaml.safe_dump(doc, sort_keys=False))  # key order decides the draws
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "charlm", "sweep", str(sweep), "--workers", str(workers)], cwd=folder,
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    study = optuna.load_study(study_name=doc["study"]["name"],
                              storage=open_storage(f"journal:{folder}/mlruns/optuna/{doc['study']['name']}.journal"))
    trials = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    # compute used: every trial's training clock, plus the rung-end previews asha runs off that clock
    used = sum(float(t.user_attrs.get("train_seconds", 0.0)) + float(t.user_attrs.get("preview_seconds", 0.0))
               for t in trials)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        errors = sorted({t.user_attrs.get("error", "") for t in trials} - {""})
        raise SystemExit(f"{name}: no trial completed in {wall / 60:.1f} min; {errors[:1] or 'give it more --minutes'}")
    best = study.best_trial
    done = sorted((t for t in trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    curve, spent = [], 0.0  # (compute used when this trial finished, its value)
    for t in done:
        spent += float(t.user_attrs.get("train_seconds", 0.0)) + float(t.user_attrs.get("preview_seconds", 0.0))
        if t.value is not None:
            curve.append((spent, t.value))
    return {"scheme": name, "best_val": best.value, "test": best.user_attrs.get("test_loss", float("nan")),
            "best_trial": f"{best.number} ({best.params.get('model.kind')})", "started": len(trials),
            "used_min": used / 60, "saved": 1 - used / (len(trials) * top_seconds), "wall_min": wall / 60,
            "curve": curve}


def reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Minutes of compute until a trial first reached ``target``, or None."""
    return next((spent / 60 for spent, value in curve if value <= target + 1e-12), None)


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget of each scheme (default 12)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per scheme (default 2)")
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "default.yaml"), help="the space and base to search")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampler seeds, each a run of every scheme")
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES),
                    help="the schemes to run (default: all three; the last column needs hyperband)")
    ap.add_argument("--keep", type=Path, help="keep each scheme's folder (journal, MLflow store) under this folder")
    args = ap.parse_args()
    base_doc = yaml.safe_load(Path(args.sweep).read_text())
    by_seed: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="charlm-search-") as tmp:
        root = args.keep.resolve() if args.keep else Path(tmp)
        for seed in args.seeds:
            rows = by_seed[seed] = []
            for name, (doc, top) in scheme_docs(base_doc, args.minutes, seed).items():
                if name not in args.schemes:
                    continue
                folder = root / f"seed-{seed}" / name
                folder.mkdir(parents=True)
                rows.append(run_scheme(name, doc, top, args.workers, folder))
                print(f"seed {seed} {name}: done in {rows[-1]['wall_min']:.1f} min", file=sys.stderr, flush=True)
            target = next((r["best_val"] for r in rows if r["scheme"] == "hyperband"), None)
            for r in rows:
                curve = r.pop("curve")
                r["reach_min"] = None if target is None else reach(curve, target)
    print(f"\n{args.minutes:g} minutes per scheme, {args.workers} workers, space of {Path(args.sweep).name}, "
          f"sampler seeds {args.seeds}\n")
    print("| seed | scheme | best val (slice) | its test loss | best trial | trials started | compute used (min) "
          "| compute saved vs all to the top | compute to Hyperband's best val (min) | wall (min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed, rows in by_seed.items():
        for r in rows:
            got = "-" if r["reach_min"] is None else f"{r['reach_min']:.1f}"
            print(f"| {seed} | {r['scheme']} | {r['best_val']:.4f} | {r['test']:.4f} | {r['best_trial']} | {r['started']} "
                  f"| {r['used_min']:.1f} | {r['saved']:.0%} | {got} | {r['wall_min']:.1f} |")
    print("\n| scheme | median best val | median its test | median compute to Hyperband's best val (min) |")
    print("|---|---|---|---|")
    for name in [r["scheme"] for r in next(iter(by_seed.values()))]:
        mine = [r for rows in by_seed.values() for r in rows if r["scheme"] == name]
        reached = [r["reach_min"] if r["reach_min"] is not None else float("inf") for r in mine]
        med = statistics.median(reached)
        print(f"| {name} | {statistics.median(r['best_val'] for r in mine):.4f} | "
              f"{statistics.median(r['test'] for r in mine):.4f} | {'not reached' if med == float('inf') else f'{med:.1f}'} |")


if __name__ == "__main__":
    main()
