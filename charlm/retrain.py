"""The study's best trial -> retrain at its clock (or what the deadline leaves) over several seeds -> test -> ``mlruns/best/<study>/``.

One MLflow run tagged ``best=true`` (linked to the study's parent run) holds the mean and spread
over seeds; each seed is a child run with everything the trainer logs. The seed with the lowest
full-pass val loss is the model saved (checkpoint, resolved config, vocabulary, metrics).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from optuna.trial import TrialState

from charlm import checkpoint, config, paths, preflight, promotion, serving
from charlm.config import dump_yaml
from charlm.device import resolve_device
from charlm.errors import CharlmError, CorruptState, OutsideFault
from charlm.models import generate
from charlm.objective import ENQUEUED
from charlm.plan import CLOSE_S, MARGIN, seed_seconds
from charlm.storage import open_planned, storage_url
from charlm.sweepfile import SweepSpec
from charlm.tracking import MlflowTracker, tracking_uri
from charlm.trainer import train

NOTE = "mlflow.note.content"  # the run's description in the MLflow UI


def _write_atomic(path: Path, text: str) -> None:
    checkpoint.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def winner(study):
    """The trial to retrain: the lowest value among the COMPLETE trials and the ASHA trials paused
    for good (PRUNED with a rung value: a decayed preview, on the same val slice). A value at a
    shorter budget is pessimistic, so a paused trial that still beats the finished ones is the
    better configuration, and the deadline, not its quality, stopped it."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    ranked = [t for t in trials if t.value is not None
              and (t.state == TrialState.COMPLETE or promotion.RUNG in t.system_attrs)]
    return min(ranked, key=lambda t: (t.value, t.number)) if ranked else None


def chosen(spec: SweepSpec, study, number: int | None = None):
    """The trial to retrain: :func:`winner`, or trial ``number``."""
    if number is not None:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number and t.params), None)
        if trial is None:
            raise CharlmError(f"Study '{spec.study.name}' has no trial {number} with parameters; "
                              f"`python -m charlm report {spec.path}` lists its trials")
    else:
        trial = winner(study)
    if trial is None:
        raise CharlmError(f"No completed trial in study '{spec.study.name}' yet; run "
                          f"`make sweep SWEEP={spec.path}` first")
    return trial


def best_config(spec: SweepSpec, trial, clock_s: float | None = None) -> config.Config:
    """The retrain's config: ``trial``'s (:func:`chosen`), its budget stretched by
    ``best.budget_multiplier``, or set to ``clock_s`` seconds by a plan, then ``best.set``."""
    cfg = spec.replay(trial)
    # A longer budget stretches the learning-rate schedule; evaluations are spaced in proportion,
    # so the trial's stopping rule (patience, margin) spans the same share of the run.
    m = spec.best.budget_multiplier
    if clock_s is not None and cfg.train.max_minutes > 0:
        m = clock_s / (cfg.train.max_minutes * 60)
    cfg = config.override(cfg, {"train.max_steps": max(1, int(round(cfg.train.max_steps * m))),
                                "train.max_minutes": cfg.train.max_minutes * m,
                                "train.validation_interval": max(1, int(round(cfg.train.validation_interval * m)))},
                          where=f"{spec.path} (best budget)")
    if clock_s is not None and cfg.train.max_minutes == 0:  # a trial judged in steps: the clock still binds
        cfg = config.override(cfg, {"train.max_minutes": clock_s / 60}, where=f"{spec.path} (best budget)")
    cfg = spec.with_best_set(cfg)
    return replace(cfg, name=f"best-{spec.study.name}")


class Clock:
    """Each retrain seed's clock: the plan's, or under ``--budget`` what the deadline leaves once
    the seeds still to train, their test passes and the registry are reserved (measured again
    before each seed, so a late start shortens the seeds left, never the deadline). A seed's cost
    besides its clock is the winner's own where its trial measured one (charlm/plan.py
    ``seed_seconds``)."""

    def __init__(self, spec: SweepSpec, budget_s: float | None, started_at: float, trial,
                 minutes: float | None = None):
        plan, self.fixed = spec.plan, None
        self.planned = self.per_seed = plan.reserve.get("per retrain seed", 30.0) if plan else 30.0
        if plan is not None:
            self.per_seed = seed_seconds(plan, spec.retrain_base().data.val_fraction, trial.user_attrs.get("finish_seconds"))
        if minutes is not None:
            self.fixed, self.ends_at = minutes * 60, None
        elif budget_s is None:
            self.fixed, self.ends_at = (plan.retrain_s if plan else None), None
        elif plan is not None and abs(plan.budget_s - budget_s) < 1 and plan.ends_at > started_at:
            self.ends_at = plan.ends_at  # `make all`: the sweep's deadline carries on
        else:
            self.ends_at = started_at + budget_s
        self.budget_s = budget_s or 0.0
        hand = "best.budget_multiplier" in spec.hand and plan is not None
        self.cap = plan.top_s * spec.best.budget_multiplier if hand else None

    def seconds(self, seeds_left: int) -> float | None:
        if self.ends_at is None:
            return self.fixed
        left = self.ends_at - time.time() - CLOSE_S - MARGIN * self.budget_s - seeds_left * self.per_seed
        clock = left / max(1, seeds_left)
        if clock < 5:
            raise CharlmError(f"The budget leaves {max(0.0, left):.0f} s for {seeds_left} retrain seed(s); give "
                              "`best --budget` more time, or fewer --seeds")
        return min(clock, self.cap) if self.cap else clock


def run_best(spec: SweepSpec, seeds: tuple[int, ...] | None = None, budget_s: float | None = None,
             started_at: float | None = None, trial_number: int | None = None, minutes: float | None = None,
             discard_corrupt: bool = False) -> Path:
    """Retrain the study's winner (or ``trial_number``: saved beside, not registered) over seeds.
    A fault from outside mid-way keeps the finished seeds and the state of the one in training in
    ``<out>/.seeds/``: the same call again goes on from them."""
    preflight.tracking(tracking_uri())  # a store or server that fails: one line before the study is read
    try:
        return _run_best(spec, seeds, budget_s, started_at, trial_number, minutes, discard_corrupt)
    except OutsideFault as e:
        raise e.keeping("kept: the finished seeds and the last evaluation of the seed in training, under "
                        f"{paths.BEST_ROOT}/; run best again to go on from them") from None


def _run_best(spec: SweepSpec, seeds: tuple[int, ...] | None, budget_s: float | None, started_at: float | None,
              trial_number: int | None, minutes: float | None, discard_corrupt: bool) -> Path:
    url = storage_url(spec)
    spec, study = open_planned(spec, url)
    trial = chosen(spec, study, trial_number)
    clock = Clock(spec, budget_s, time.time() if started_at is None else started_at, trial, minutes)
    seeds = tuple(seeds or spec.best.seeds)
    if clock.ends_at is not None and clock.per_seed > clock.planned + 1:
        print(f"each retrain seed keeps {clock.per_seed:.0f} s besides its clock for its passes and writes: trial "
              f"{trial.number} took {trial.user_attrs['finish_seconds']:.0f} s after its own clock (the plan kept "
              f"{clock.planned:.0f} s, from the base experiment's speed)", file=sys.stderr)
    cfg = best_config(spec, trial, clock.seconds(len(seeds)))
    own = trial_number is not None
    out = paths.BEST_ROOT / (f"{spec.study.name}-trial-{trial.number}" if own else spec.study.name)
    need = checkpoint.state_bytes(cfg, 256) * (len(seeds) + 1)
    preflight.folder(out, "the model folder", need)  # before anything trains: one line if it cannot be written
    print(f"{'trial' if own else 'best trial'} {trial.number} of study '{spec.study.name}' ({paths.redact(url)}): "
          f"val {trial.value:.4f}{' (' + trial.user_attrs[ENQUEUED] + ')' if ENQUEUED in trial.user_attrs else ''}; "
          f"retraining {budget_words(cfg)} x seeds {list(seeds)}")
    tags = {"best": "true", "optuna.study_name": spec.study.name, "optuna.best_trial": str(trial.number),
            "charlm.study_run": study.user_attrs.get("mlflow_parent_run_id", "")}
    rows = []
    if ENQUEUED in trial.user_attrs:
        tags[ENQUEUED] = trial.user_attrs[ENQUEUED]
    note = (f"{'Trial' if own else 'Best trial'} {trial.number} of Optuna study '{spec.study.name}' (val "
            f"{trial.value:.4f}) retrained for {budget_words(cfg)} over seeds {list(seeds)}; the seed with the lowest "
            "val loss is saved" + ("." if own else f" and registered as charlm-{spec.study.name}."))
    with MlflowTracker(spec.study.name, f"best-trial-{trial.number}", tags={**tags, NOTE: note}) as parent:
        parent.log_params({**config.flatten(cfg), "seeds": list(seeds), "best_trial": trial.number,
                           "budget_multiplier": spec.best.budget_multiplier})
        best_loaded = None
        for i, seed in enumerate(seeds):
            if i:  # the deadline is measured again: a late first seed shortens the next, not the budget
                cfg = best_config(spec, trial, clock.seconds(len(seeds) - i))
            row, loaded = _seed(spec, cfg, seed, out, parent.run_id, tags, discard_corrupt)
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
        registered = None if own else serving.log_and_register(parent.run_id, out / checkpoint.FILENAME,
                                                               spec.study.name, saved["val_loss"], figures, parent.uri)
    print(f"test loss {summary['test_loss_mean']:.4f} +- {summary['test_loss_std']:.4f} nats/char over seeds "
          f"{list(seeds)} (val {summary['val_loss_mean']:.4f}); saved seed {seed} to {out}/")
    if registered is not None:
        print(registered.describe())
    # where it trained (a GPU samples a large model in a blink), or the CPU where that GPU is absent:
    # every seed kept from a run on another machine
    device = resolve_device("auto" if cfg.train.device == "cuda" else cfg.train.device)
    start = torch.tensor([[loaded.vocab.index.get("\n", 0)]], device=device)
    text = generate(loaded.model.to(device), start, 300, temperature=0.8,
                    generator=torch.Generator(device=device).manual_seed(0))
    print("--- sample ---\n" + loaded.vocab.decode(text[0].tolist()))
    return out


def budget_words(cfg: config.Config) -> str:
    """What a retrain's budget is in fact: its clock when it has one that binds, else its steps."""
    t = cfg.train
    return f"{t.max_minutes:.2f} minutes" if t.clock_only else (
        f"{t.max_steps} steps" + (f" or {t.max_minutes:.2f} minutes" if t.max_minutes > 0 else ""))


def _seed(spec: SweepSpec, cfg: config.Config, seed: int, out: Path, parent_run_id: str, tags: dict,
          discard_corrupt: bool = False):
    """One seed's retrain as a child run, or its result kept from an earlier, interrupted `make best`."""
    seed_cfg = replace(config.override(cfg, {"train.seed": seed}, where="best seeds"), name=f"best-seed-{seed}")
    # A finished seed is kept under a name tied to its exact config, so an interrupted
    # `make best` run again skips the seeds already done and resumes the one it was in.
    key = hashlib.sha256(dump_yaml(seed_cfg).encode()).hexdigest()[:12]
    done, kept = out / ".seeds" / f"seed-{seed}-{key}.json", out / ".seeds" / f"seed-{seed}-{key}.pt"
    if done.is_file() and kept.is_file():
        try:
            row, loaded = json.loads(done.read_text()), checkpoint.load(kept)
        except (ValueError, checkpoint.CheckpointError) as e:
            if not discard_corrupt:
                raise CorruptState(f"The kept seed {seed} ({kept}) cannot be read ({type(e).__name__}); to retrain "
                                   "that seed, run best again with --discard-corrupt-state") from None
            print(f"  seed {seed}: discarded the unreadable kept seed {kept}; retraining it", file=sys.stderr)
            done.unlink(missing_ok=True)
            kept.unlink(missing_ok=True)
        else:
            print(f"  seed {seed}: val {row['val_loss']:.4f}  test {row['test_loss']:.4f}  "
                  f"(kept from an earlier run: MLflow run {row['run_id']})")
            return row, loaded
    note = (f"Seed {seed} of the retrain of best trial {tags['optuna.best_trial']} of Optuna study "
            f"'{spec.study.name}'; a child of the best-trial run.")
    with MlflowTracker(spec.study.name, seed_cfg.name, parent_run_id=parent_run_id,
                       tags={**tags, "seed": str(seed), NOTE: note}) as tracker:
        # an interrupted seed resumes from its last evaluation, optimizer state included
        res = train(seed_cfg, tracker, state_path=out / ".seeds" / f"seed-{seed}-{key}.state.pt",
                    discard_corrupt=discard_corrupt)
        loaded = checkpoint.load(res.checkpoint) if res.checkpoint else None
    row = {"seed": seed, "val_loss": res.best_val_loss, "test_loss": res.test_loss,
           "steps": res.steps, "stop": res.stop_reason, "seconds": round(res.train_seconds, 1),
           "clock_minutes": round(cfg.train.max_minutes, 3),
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
        "enqueued": trial.user_attrs.get(ENQUEUED, ""), "params": trial.params,
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
