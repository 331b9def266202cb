"""The Python API: what ``python -m charlm`` calls, and what a script or a notebook calls.

    import charlm

    run = charlm.train("experiments/gpt.yaml", {"train.max_steps": 500})   # one model, one MLflow run
    study = charlm.sweep("sweeps/smoke.yaml", workers=2)                   # an Optuna study
    best = charlm.best("sweeps/smoke.yaml")                                # its winner retrained, tested, registered
    model = charlm.load(best.path)                     # or "models:/charlm-smoke@champion"
    model.score("ROMEO:\\nWhat light through yonder window breaks?")       # nats per character
    model.generate("ROMEO:", chars=200)

Each function takes what its command's flags take, and raises :class:`charlm.errors.CharlmError`
(one line naming the problem and the fix) where the command prints ``error: ...`` and exits 2.
Heavy imports (torch, MLflow, Optuna) happen inside the calls, so ``import charlm`` stays light.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlm.errors import CharlmError, first_line

if TYPE_CHECKING:
    import optuna

    from charlm.checkpoint import Loaded
    from charlm.config import Config
    from charlm.data import Corpus
    from charlm.evaluate import EvalResult
    from charlm.sweepfile import SweepSpec
    from charlm.trainer import RunResult


# ----------------------------------------------------------------------------- one model


def experiment(config: str | Path | Config, overrides: Mapping[str, Any] | Iterable[str] = ()) -> tuple[Config, Corpus]:
    """The resolved config and its text, checked: a config file (or a :class:`Config`) with
    ``overrides`` (``{"train.lr": 1e-3}`` or ``["train.lr=1e-3"]``) applied. What ``train --dry-run``
    prints; nothing is trained or written."""
    from charlm import config as configs
    from charlm.data import load_corpus
    from charlm.models import check_corpus_fit

    if isinstance(overrides, Mapping):
        sets, values = [], dict(overrides)
    else:
        sets, values = list(overrides), {}
    if isinstance(config, configs.Config):
        values = {**dict(configs.parse_override(s) for s in sets), **values}
        cfg = configs.override(config, values, where="overrides") if values else config
    else:
        cfg = configs.load(config, sets)
        cfg = configs.override(cfg, values, where="overrides") if values else cfg
    corpus = load_corpus(cfg.data)  # data problems fail before a run is created
    check_corpus_fit(cfg, len(corpus.vocab))
    return cfg, corpus


@dataclass(frozen=True)
class Trained:
    """What :func:`train` returns."""

    result: RunResult  # losses, steps, stop reason, seconds (charlm/trainer.py)
    config: Config  # the resolved config it trained with
    run_id: str | None  # the MLflow run; None with track=False
    checkpoint: str | None  # where the best weights are kept: the run's artifact and/or out/model.pt


def train(config: str | Path | Config, overrides: Mapping[str, Any] | Iterable[str] = (), *, track: bool = True,
          out: str | Path | None = None, discard_corrupt_state: bool = False) -> Trained:
    """Train one model and record it as one MLflow run (``track=False``: none). ``out``: also keep
    the best checkpoint as ``out/model.pt``.

    Every place the run writes is checked before it trains (charlm/preflight.py). Its training state
    is saved at each evaluation under ``mlruns/states/``: where a store, a server or a disk fails
    mid-run (an :class:`~charlm.errors.OutsideFault`), the same call again resumes from that state
    in a new run (and the run left RUNNING ends FAILED: charlm/tracking.py ``close_dead_runs``).
    ``discard_corrupt_state``: a state that cannot be read is deleted and the run starts over
    (without it: one line naming the file)."""
    import hashlib

    from charlm import checkpoint, paths, preflight
    from charlm.config import dump_yaml

    cfg, corpus = experiment(config, overrides)
    need = checkpoint.state_bytes(cfg, len(corpus.vocab))
    if out is not None:
        preflight.folder(out, "the --out folder", need)
    preflight.folder(paths.STATES, "the training-state folder", 2 * need)
    if track:
        from charlm.tracking import tracking_uri

        preflight.tracking(tracking_uri(), need)
    shared = paths.STATES / f"train-{hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()[:12]}.pt"
    with _own_state(shared) as state:
        return _train(cfg, corpus, state, track, out, discard_corrupt_state, resumable=state == shared)


def _train(cfg: Config, corpus: Corpus, state: Path, track: bool, out: str | Path | None,
           discard_corrupt_state: bool, resumable: bool = True) -> Trained:
    """:func:`train` once its places are checked, from the training state at ``state``
    (``resumable``: the state a rerun of the same command resumes from, not a process's own)."""
    from charlm import checkpoint
    from charlm.errors import OutsideFault
    from charlm.trainer import train as run

    def keep(result, run_id: str | None) -> str | None:  # before the run's scratch folder goes away
        if out is None or not result.checkpoint:
            return None
        try:
            with open(result.checkpoint, "rb") as src:
                return str(checkpoint.write_atomic(Path(out) / checkpoint.FILENAME,
                                                   lambda f: shutil.copyfileobj(src, f)))
        except OutsideFault as e:
            raise e.keeping(f"kept: the model in MLflow run {run_id} (artifact model/{checkpoint.FILENAME})"
                            if run_id else "the model was not kept (no MLflow run: drop --no-track)") from None

    try:
        if not track:
            from charlm.tracking import NullTracker

            scratch = NullTracker()  # holds the checkpoint until keep() has copied it
            result = run(cfg, scratch, corpus=corpus, state_path=state, discard_corrupt=discard_corrupt_state)
            return Trained(result, cfg, None, keep(result, None))
        from charlm.tracking import MlflowTracker

        with MlflowTracker(cfg.experiment, cfg.name) as tracker:
            print(f"MLflow run {tracker.run_id} in experiment '{cfg.experiment}' ({tracker.uri})", file=sys.stderr)
            result = run(cfg, tracker, corpus=corpus, state_path=state, discard_corrupt=discard_corrupt_state)
            where = tracker.artifact_uri(f"model/{checkpoint.FILENAME}") if result.checkpoint else None
            kept = keep(result, tracker.run_id)
        return Trained(result, cfg, tracker.run_id, (where or "") + (f" (and {kept})" if kept else "") or None)
    except OutsideFault as e:
        if resumable and state.is_file():
            e.keeping(f"kept: the training state of its last evaluation, {state}; run the same command again to "
                      "resume from it")
        raise
    except (KeyboardInterrupt, SystemExit):  # interrupted on purpose: the next call starts afresh
        state.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _own_state(path: Path):
    """``path`` while no other process trains from it, held for the run; else a state of this
    process's own (two identical runs at once must not resume from each other's saves). Leaves no
    files behind: the lock file goes once no state is left to resume, and a process-own state whose
    process is gone (killed) is removed by the next run of the same config on this machine."""
    import fcntl
    import os

    from charlm.hosts import pid_alive

    for leftover in path.parent.glob(f"{path.stem}-pid*{path.suffix}"):
        pid = leftover.stem.rpartition("-pid")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)
    lock = path.with_suffix(".lock")
    while True:
        f = open(lock, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            own = path.with_name(f"{path.stem}-pid{os.getpid()}{path.suffix}")
            try:
                yield own
            finally:
                own.unlink(missing_ok=True)  # no later run resumes another process's save
            return
        try:  # the lock file its last holder removed after we opened it is no lock: take the new one
            if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield path
    finally:
        if not path.exists():
            lock.unlink(missing_ok=True)  # nothing to resume: the next run makes a new lock
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# ----------------------------------------------------------------------------- a study


def sweep_spec(path: str | Path, *, storage: str | None = None, budget: str | None = None, text: str | Path | None = None,
               seed: int | None = None, n_trials: int | None = None) -> SweepSpec:
    """A sweep file, validated, with the command line's overrides applied (what ``--dry-run`` checks)."""
    from charlm.sweepfile import load_sweep

    return load_sweep(path, n_trials=n_trials, storage=storage, budget=budget, text=None if text is None else str(text),
                      seed=seed)


def sweep(path: str | Path = "sweeps/default.yaml", *, workers: int = 1, n_trials: int | None = None,
          storage: str | None = None, budget: str | None = None, text: str | Path | None = None, seed: int | None = None,
          warm_start: str | None = None, dry_run: bool = False, started_at: float | None = None,
          worker_index: int | None = None) -> optuna.Study | str:
    """Run (or resume) the Optuna study a sweep file declares; returns the study. With ``dry_run``
    nothing trains: returns the preview (the space, the plan, the study's first trials) as text.
    ``budget`` counts from ``started_at`` (default: now). ``worker_index`` is the coordinator's."""
    if workers < 1:
        raise CharlmError(f"--workers must be >= 1, got {workers}")
    spec = sweep_spec(path, storage=storage, budget=budget, text=text, seed=seed, n_trials=n_trials)
    from charlm import study

    if dry_run:
        return study.dry_run(spec)
    return study.run(spec, workers=workers, worker_index=worker_index, started_at=started_at or time.time(),
                     warm_start=warm_start)


@dataclass(frozen=True)
class Retrained:
    """What :func:`best` returns: the saved model's folder and its figures (its ``metrics.json``)."""

    path: Path  # mlruns/best/<study>/ (or <study>-trial-N/)
    metrics: dict  # test_loss_mean, test_loss_std, network_test_loss_mean, val_loss_mean, runs, ...

    def load(self, device: str = "auto") -> Model:
        """The saved model, as :func:`load` gives it."""
        return load(self.path, device)


def best(path: str | Path = "sweeps/default.yaml", *, seeds: Iterable[int] | None = None, storage: str | None = None,
         budget: str | None = None, text: str | Path | None = None, trial: int | None = None,
         minutes: float | None = None, started_at: float | None = None, discard_corrupt_state: bool = False) -> Retrained:
    """Retrain the study's winner (or ``trial``, saved beside it and not registered) once per seed,
    test it, save the seed with the lowest val loss and register it as ``charlm-<study>``. Each
    seed trains the trial's clock, ``minutes`` if given, or under ``budget`` what the deadline leaves.
    A fault from outside keeps the finished seeds and the one in training: the same call goes on
    from them. ``discard_corrupt_state``: a kept seed or state that cannot be read is retrained."""
    import json

    from charlm import config
    from charlm.plan import parse_duration

    spec = sweep_spec(path, storage=storage, text=text, budget=budget)
    seeds = tuple(seeds) if seeds else None
    for seed in seeds or ():  # before the study is opened or a run created
        config.override(spec.base_config(), {"train.seed": seed}, where="--seeds")
    if minutes is not None and not 0 < minutes < 10_000:
        raise CharlmError(f"--minutes must be a number of minutes > 0, got {minutes}")
    from charlm.retrain import run_best

    out = run_best(spec, seeds, budget_s=parse_duration(budget) if budget else None,
                   started_at=started_at or time.time(), trial_number=trial, minutes=minutes,
                   discard_corrupt=discard_corrupt_state)
    return Retrained(out, json.loads((out / "metrics.json").read_text()))


# ----------------------------------------------------------------------------- a trained model


class Model:
    """A trained model from a checkpoint: what :func:`load` returns, and what ``eval``, ``sample``
    and the served MLflow model call."""

    def __init__(self, loaded: Loaded, device: str):
        self.loaded, self.device = loaded, device
        self.model = loaded.model.to(device)

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.loaded.path

    @property
    def config(self) -> Config:
        """The config it was trained with."""
        return self.loaded.cfg

    @property
    def vocab(self):
        """Its characters (``CharVocab``: ``encode``, ``decode``)."""
        return self.loaded.vocab

    def evaluate(self, text: str | None = None, *, split: str | None = None, skip_unknown: bool = False) -> EvalResult:
        """The full-pass score of ``text``, or of a ``split`` (train | val | test) of the text the
        model was trained on: ``.loss`` (nats/char), ``.bpc``, ``.perplexity``, ``.chars``."""
        from charlm.evaluate import full_pass

        if (text is None) == (split is None):
            raise CharlmError("give evaluate a text or a split (train | val | test), not both")
        if split is not None:
            from charlm.data import load_corpus

            corpus = load_corpus(self.config.data)
            if corpus.vocab != self.vocab:
                raise CharlmError(f"The corpus {corpus.path} no longer matches the checkpoint's vocabulary")
            ids, source = corpus.split(split), f"{corpus.path.name}:{split}"
        else:
            ids, source = self.vocab.encode(text, skip_unknown=skip_unknown), "the text"
        if len(ids) < 2:
            raise CharlmError(f"{source}: fewer than 2 known characters; nothing to score")
        t = self.config.train
        return full_pass(self.model, ids, t.eval_stride, t.eval_batch_size, self.device)

    def score(self, text: str, *, skip_unknown: bool = False) -> float:
        """``text``'s loss in nats per character (full pass)."""
        return self.evaluate(text, skip_unknown=skip_unknown).loss

    def generate(self, prompt: str = "", chars: int = 200, *, temperature: float = 0.8, top_k: int | None = None,
                 seed: int = 0, skip_unknown: bool = False) -> str:
        """``chars`` new characters after ``prompt`` (empty: a newline), without the prompt;
        ``temperature`` 0 is greedy, ``top_k`` samples among the k likeliest."""
        import torch

        from charlm.models import generate

        if chars < 0:
            raise CharlmError(f"chars must be >= 0, got {chars}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise CharlmError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise CharlmError(f"top_k must be an integer >= 1 (None samples from every character), got {top_k}")
        ids = (self.vocab.encode(prompt, skip_unknown=skip_unknown).tolist() if prompt
               else [self.vocab.index.get("\n", 0)])
        if not ids:
            raise CharlmError("The prompt has no character the model knows; give another prompt")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(self.model, torch.tensor([ids], device=self.device), chars, temperature, top_k, gen)
        return self.vocab.decode(out[0, len(ids):].tolist())


def load(model: str | Path = "mlruns/best", device: str = "auto") -> Model:
    """A trained model: a checkpoint file, a folder holding one (``mlruns/best`` takes the newest
    ``mlruns/best/<study>/``), or a registered model's URI (``models:/charlm-smoke@champion``,
    ``models:/charlm-smoke/2``) in the store charlm writes (or ``MLFLOW_TRACKING_URI``)."""
    from charlm import checkpoint
    from charlm.device import resolve_device

    where = str(model)
    if where.startswith(("models:/", "runs:/")):
        where = str(_download(where))
    device = resolve_device(device)
    return Model(checkpoint.load(where, device), device)


def _download(uri: str) -> Path:
    """The checkpoint inside a logged charlm model (its ``checkpoint`` artifact)."""
    import mlflow

    from charlm.serving import fluent_uri
    from charlm.tracking import tracking_uri

    try:
        with fluent_uri(tracking_uri()):  # the registry too: models:/ resolves where charlm registered
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # MLflow raises its own types for a missing name, version or alias
        raise CharlmError(f"Cannot load {uri} from {tracking_uri()}: {first_line(e)}") from None
    found = sorted((folder / "artifacts").glob("*.pt"))
    if not found:
        raise CharlmError(f"{uri} is not a charlm model (no checkpoint among its artifacts)")
    return found[0]
