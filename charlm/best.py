"""The study's best trial -> retrain with the full budget over several seeds -> test -> ``mlruns/best/<study>/``.

One MLflow run tagged ``best=true`` (linked to the study's parent run) holds the mean and spread
over seeds; each seed is a child run with everything the trainer logs. The seed with the lowest
full-pass val loss is the model saved (checkpoint, resolved config, vocabulary, metrics).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from optuna.trial import TrialState

from charlm import checkpoint, config, paths, serving
from charlm.config import dump_yaml
from charlm.device import resolve_device
from charlm.errors import CharlmError
from charlm.models import generate
from charlm.storage import open_study, storage_url
from charlm.sweepfile import SweepSpec
from charlm.tracking import MlflowTracker
from charlm.train import train

NOTE = "mlflow.note.content"  # the run's description in the MLflow UI


def _write_atomic(path: Path, text: str) -> None:
    checkpoint.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def best_config(spec: SweepSpec, study) -> tuple[config.Config, object]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise CharlmError(f"No completed trial in study '{spec.study.name}' yet; run "
                          f"`make sweep SWEEP={spec.path}` first")
    trial = study.best_trial
    cfg = spec.replay(trial)
    # A longer budget stretches the learning-rate schedule; evaluations are spaced in proportion,
    # so the trial's stopping rule (patience, margin) spans the same share of the run.
    m = spec.best.budget_multiplier
    cfg = config.override(cfg, {"train.max_steps": max(1, int(round(cfg.train.max_steps * m))),
                                "train.max_minutes": cfg.train.max_minutes * m,
                                "train.validation_interval": max(1, int(round(cfg.train.validation_interval * m)))},
                          where=f"{spec.path} (best budget)")
    cfg = config.override(cfg, spec.best.set, where=f"{spec.path} (best.set)")
    return replace(cfg, name=f"best-{spec.study.name}"), trial


def run_best(spec: SweepSpec, seeds: tuple[int, ...] | None = None) -> Path:
    url = storage_url(spec)
    study = open_study(spec, url)
    cfg, trial = best_config(spec, study)
    seeds = tuple(seeds or spec.best.seeds)
    out = paths.BEST_ROOT / spec.study.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"best trial {trial.number} of study '{spec.study.name}' ({paths.redact(url)}): val {trial.value:.4f}; "
          f"retraining {cfg.train.max_steps} steps x seeds {list(seeds)}")
    tags = {"best": "true", "optuna.study_name": spec.study.name, "optuna.best_trial": str(trial.number),
            "charlm.study_run": study.user_attrs.get("mlflow_parent_run_id", "")}
    rows = []
    note = (f"Best trial {trial.number} of Optuna study '{spec.study.name}' (val {trial.value:.4f}) retrained "
            f"for {cfg.train.max_steps} steps over seeds {list(seeds)}; the seed with the lowest val loss is saved "
            f"and registered as charlm-{spec.study.name}.")
    with MlflowTracker(spec.study.name, f"best-trial-{trial.number}", tags={**tags, NOTE: note}) as parent:
        parent.log_params({**config.flatten(cfg), "seeds": list(seeds), "best_trial": trial.number,
                           "budget_multiplier": spec.best.budget_multiplier})
        best_loaded = None
        for seed in seeds:
            row, loaded = _seed(spec, cfg, seed, out, parent.run_id, tags)
            rows.append(row)
            if loaded and (best_loaded is None or row["val_loss"] < best_loaded[0]):
                best_loaded = (row["val_loss"], seed, loaded)
        if best_loaded is None:
            raise CharlmError("Every retrain diverged; nothing to save. Lower train.lr in the sweep's space")
        _, seed, loaded = best_loaded
        summary = _summary(spec, trial, seeds, seed, rows)
        parent.log_metrics({k: v for k, v in summary.items() if k.endswith(("_mean", "_std"))})
        parent.set_tags({"saved_seed": seed})
        checkpoint.save(out / checkpoint.FILENAME, loaded.model, loaded.cfg, loaded.vocab, loaded.meta)
        _write_atomic(out / "config.yaml", dump_yaml(loaded.cfg))
        _write_atomic(out / "vocab.json", json.dumps(loaded.vocab.to_list(), ensure_ascii=False))
        _write_atomic(out / "metrics.json", json.dumps(summary, indent=2))
        for name in ("config.yaml", "metrics.json"):
            parent.log_artifact(out / name)
        saved = next(r for r in rows if r["seed"] == seed)
        figures = {"trial": trial.number, "seed": seed, "seeds": list(seeds), "test_loss": saved["test_loss"],
                   **{k: v for k, v in summary.items() if k.startswith("test_loss_")}}
        registered = serving.log_and_register(parent.run_id, out / checkpoint.FILENAME, spec.study.name,
                                              saved["val_loss"], figures, parent.uri)
    print(f"test loss {summary['test_loss_mean']:.4f} +- {summary['test_loss_std']:.4f} nats/char over seeds "
          f"{list(seeds)} (val {summary['val_loss_mean']:.4f}); saved seed {seed} to {out}/")
    print(registered.describe())
    # where it trained (a GPU samples a large model in a blink), or the CPU where that GPU is absent:
    # every seed kept from a run on another machine
    device = resolve_device("auto" if cfg.train.device == "cuda" else cfg.train.device)
    start = torch.tensor([[loaded.vocab.index.get("\n", 0)]], device=device)
    text = generate(loaded.model.to(device), start, 300, temperature=0.8,
                    generator=torch.Generator(device=device).manual_seed(0))
    print("--- sample ---\n" + loaded.vocab.decode(text[0].tolist()))
    return out


def _seed(spec: SweepSpec, cfg: config.Config, seed: int, out: Path, parent_run_id: str, tags: dict):
    """One seed's retrain as a child run, or its result kept from an earlier, interrupted `make best`."""
    seed_cfg = replace(config.override(cfg, {"train.seed": seed}, where="best seeds"), name=f"best-seed-{seed}")
    # A finished seed is kept under a name tied to its exact config, so an interrupted
    # `make best` run again skips the seeds already done and resumes the one it was in.
    key = hashlib.sha256(dump_yaml(seed_cfg).encode()).hexdigest()[:12]
    done, kept = out / ".seeds" / f"seed-{seed}-{key}.json", out / ".seeds" / f"seed-{seed}-{key}.pt"
    if done.is_file() and kept.is_file():
        row, loaded = json.loads(done.read_text()), checkpoint.load(kept)
        print(f"  seed {seed}: val {row['val_loss']:.4f}  test {row['test_loss']:.4f}  "
              f"(kept from an earlier run: MLflow run {row['run_id']})")
        return row, loaded
    note = (f"Seed {seed} of the retrain of best trial {tags['optuna.best_trial']} of Optuna study "
            f"'{spec.study.name}'; a child of the best-trial run.")
    with MlflowTracker(spec.study.name, seed_cfg.name, parent_run_id=parent_run_id,
                       tags={**tags, "seed": str(seed), NOTE: note}) as tracker:
        # an interrupted seed resumes from its last evaluation, optimizer state included
        res = train(seed_cfg, tracker, state_path=out / ".seeds" / f"seed-{seed}-{key}.state.pt")
        loaded = checkpoint.load(res.checkpoint) if res.checkpoint else None
    row = {"seed": seed, "val_loss": res.best_val_loss, "test_loss": res.test_loss,
           "steps": res.steps, "stop": res.stop_reason, "seconds": round(res.train_seconds, 1),
           "run_id": res.run_id, **res.mixture}
    mix = (f", network alone {res.mixture['network_test_loss']:.4f}, mixed with a "
           f"{cfg.model.mix_order}-gram at mean w={res.mixture['mix_weight']:.3f}") if res.mixture else ""
    print(f"  seed {seed}: val {res.best_val_loss:.4f}  test {res.test_loss:.4f}  "
          f"({res.steps} steps, {res.stop_reason}, {res.train_seconds:.0f}s{mix})")
    if loaded:
        done.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(kept, loaded.model, loaded.cfg, loaded.vocab, loaded.meta)
        _write_atomic(done, json.dumps(row))
    return row, loaded


def _summary(spec: SweepSpec, trial, seeds: tuple[int, ...], saved_seed: int, rows: list[dict]) -> dict:
    """Mean and spread over seeds; with a mixture, also the network alone."""
    tests, vals = [r["test_loss"] for r in rows], [r["val_loss"] for r in rows]
    summary = {
        "study": spec.study.name, "trial": trial.number, "trial_val_loss": trial.value,
        "seeds": list(seeds), "saved_seed": saved_seed,
        "test_loss_mean": statistics.fmean(tests), "test_loss_std": statistics.pstdev(tests),
        "val_loss_mean": statistics.fmean(vals), "val_loss_std": statistics.pstdev(vals),
        "runs": rows,
    }
    if all("network_test_loss" in r for r in rows):  # what the n-gram mixture adds
        nets = [r["network_test_loss"] for r in rows]
        summary["network_test_loss_mean"] = statistics.fmean(nets)
        summary["network_test_loss_std"] = statistics.pstdev(nets)
    return summary
