"""``train(cfg, tracker, on_eval=None) -> RunResult``: one run, from config to tested checkpoint.

``train`` reads as its phases: set up, log the parameters, resume if a saved state of the same
config exists (``state_path``), run the loop (charlm/loop.py; ``on_eval`` may stop it with a
:class:`StopReason`), evaluate the best weights once in full, log the results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from charlm.config import Config, dump_yaml, flatten
from charlm.data import Batcher, Corpus, load_corpus
from charlm.device import autocast_for, compile_for, compile_mode_for, guard_memory, resolve_device
from charlm.evaluate import EvalResult
from charlm.loop import EvalEvent, Loop, Run, StopReason, TrainState
from charlm.models import build_model, count_params, generate
from charlm.optim import make_optimizer
from charlm.plots import loss_curve
from charlm.stopping import Patience
from charlm.tracking import Tracker, git_commit


@dataclass
class RunResult:
    best_val_loss: float  # full pass over val with the restored best weights (NaN when pruned: never made)
    test_loss: float  # full pass over test with the same weights (NaN when pruned)
    best_step: int | None
    stop_reason: StopReason
    steps: int
    early_stop_step: int | None
    train_seconds: float
    eval_seconds: float  # intermediate evaluations (inside train_seconds)
    n_params: int
    checkpoint: Path | None
    run_id: str | None = None
    history: list[dict] = field(default_factory=list)
    final_eval_seconds: float = 0.0  # the full passes over val and test after training
    mixture: dict = field(default_factory=dict)  # model.mix_order > 0: mix_weight, network_test_loss
    slice_val_loss: float = math.nan  # the best intermediate evaluation: what a sweep ranks trials by
    rung_value: float = math.nan  # stopped at a rung's end: the val-slice loss of a decayed copy (Loop.preview)
    preview_seconds: float = 0.0  # what that copy's decay and evaluation took (off the run's clock)
    finish_seconds: float = 0.0  # everything after the clock: the full passes, the sample, the model and plots logged

    @property
    def best_val_bpc(self) -> float:
        return self.best_val_loss / math.log(2)

    @property
    def test_bpc(self) -> float:
        return self.test_loss / math.log(2)


def setup(cfg: Config, tracker: Tracker, corpus: Corpus | None) -> Run:
    device = resolve_device(cfg.train.device)
    guard_memory(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    corpus = corpus or load_corpus(cfg.data)
    model = build_model(cfg, len(corpus.vocab)).to(device)
    t_fit = time.perf_counter()
    model.fit(corpus.train)  # count-based models (ngram) learn from the whole split in one pass
    fit_seconds = time.perf_counter() - t_fit
    trainable = any(p.requires_grad for p in model.parameters())
    compiled, mode = None, None
    if trainable and compile_for(cfg.train.compile, device, cfg.train.max_steps, cfg.train.max_minutes):
        torch._dynamo.reset()  # a worker's earlier trials (other shapes) must not use up the recompile limit
        mode = compile_mode_for(cfg.train.compile_mode, device)
        compiled = torch.compile(model, mode=mode)
    return Run(cfg, tracker, corpus, device, model, autocast_for(cfg.train.precision, device),
               make_optimizer(model, cfg) if trainable else None,
               Batcher(corpus.train, cfg.data.context, cfg.train.batch_size, cfg.train.seed, device),
               count_params(model), fit_seconds, compiled, cuda_graphs=mode == "reduce-overhead" and device == "cuda")


def log_params(run: Run) -> None:
    cfg, tracker = run.cfg, run.tracker
    tracker.log_params({
        **flatten(cfg), "model_kind": cfg.model.kind, "n_params": run.n_params, "data_sha256": run.corpus.sha256,
        "data_file": run.corpus.path.name, "vocab_size": len(run.corpus.vocab), "git_commit": git_commit(),
        "device": run.device, "amp": "bf16" if run.amp else "fp32", "torch_threads": torch.get_num_threads(),
        "compiled": run.compiled is not None, "cuda_graphs": run.cuda_graphs,
    })
    tracker.log_metrics({"n_params": run.n_params}, step=0)  # also a metric: the UI charts metrics, not params
    tracker.log_dataset(run.corpus)
    if cfg.train.system_metrics:
        tracker.start_system_metrics()
    (tracker.workdir / "config.yaml").write_text(dump_yaml(cfg))
    tracker.log_artifact(tracker.workdir / "config.yaml")


def resume(run: Run, state_path: Path | None, continued: bool = False, discard_corrupt: bool = False) -> TrainState:
    """The saved state when it matches this config, else a fresh one. Its curve is re-logged from
    step 0 in a new run; a ``continued`` run (a promoted trial) already has it. An unreadable state
    stops the run (one line) unless ``discard_corrupt`` (charlm/loop.py ``TrainState.load``)."""
    fresh = TrainState(Patience(run.cfg.train.patience, run.cfg.train.min_relative_improvement))
    state = TrainState.load(state_path, run, discard_corrupt) if run.optimizer is not None else None
    if state is None:
        return fresh
    if continued:
        return state
    for row in state.history:
        run.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    run.tracker.set_tags({"resumed_from_step": str(state.step)})
    print(f"resuming from step {state.step} (saved state {Path(state_path).name})", flush=True)
    return state


def train(cfg: Config, tracker: Tracker, on_eval: Callable[[EvalEvent], StopReason | None] | None = None,
          corpus: Corpus | None = None, state_path: Path | None = None, progress: bool = True,
          until: float | None = None, continued: bool = False, stop_at: float | None = None,
          discard_corrupt: bool = False) -> RunResult:
    """``until``: stop at that many training seconds, keeping the state at ``state_path`` (a
    sweep's rung); ``continued``: carry on from that state in the same run (a promoted trial);
    ``stop_at``: the study's deadline (epoch seconds), where the run evaluates once and stops;
    ``discard_corrupt``: an unreadable state at ``state_path`` is deleted and the run starts over."""
    run = setup(cfg, tracker, corpus)
    if not continued:
        log_params(run)
    state = resume(run, state_path, continued, discard_corrupt)
    loop = Loop(run, state, on_eval, state_path, until, stop_at)
    try:
        reason = loop.until_stop(progress)
    except (KeyboardInterrupt, SystemExit):
        keep_interrupted(run, state)
        raise
    if reason is StopReason.RUNG_END:
        elapsed, t0 = loop.elapsed(), time.perf_counter()
        value = loop.preview()
        previewed = time.perf_counter() - t0
        return replace(finish(run, state, reason, elapsed, rung_value=value), preview_seconds=previewed)
    if state_path is not None:  # finished: nothing left to resume
        Path(state_path).unlink(missing_ok=True)
    return finish(run, state, reason, loop.elapsed())


def keep_interrupted(run: Run, state: TrainState) -> None:
    """Ctrl-C / SIGTERM: keep the best checkpoint so far with the run before it ends KILLED."""
    run.tracker.set_tags({"stop_reason": StopReason.INTERRUPTED})
    if state.best_state is not None:
        log_best_model(run, state)


def log_best_model(run: Run, state: TrainState) -> None:
    """Log the best weights as the run's model, written first unless this process wrote them last
    (a run with a resume state writes no checkpoint while it trains; a promoted one may end its rung
    with the best weights it restored)."""
    if run.saved_step != state.stop.best_step or not run.ckpt_path.is_file():
        run.model.load_state_dict(state.best_state)
        run.save_checkpoint({"step": state.stop.best_step, "slice_val_loss": state.stop.best})
    run.tracker.log_artifact(run.ckpt_path, "model")


def final_evaluation(run: Run, state: TrainState) -> tuple[EvalResult, EvalResult, dict]:
    """Full passes over val and test with the best weights restored; a mixture first scores the
    network alone on test (its weight starts at 1), then fits its weight on val."""
    run.model.load_state_dict(state.best_state)
    t = run.cfg.train
    test = run.score(run.corpus.test)
    weight = run.model.calibrate(run.corpus.val, stride=t.eval_stride, batch_size=t.eval_batch_size,
                                 device=run.device)
    mixed = {}
    if weight is not None:
        mixed = {"network_test_loss": test.loss, "mix_weight": weight}
        test = run.score(run.corpus.test)
    val = run.score(run.corpus.val)
    run.save_checkpoint({"step": state.stop.best_step, "slice_val_loss": state.stop.best,
                         "val_loss": val.loss, "test_loss": test.loss})
    return val, test, mixed


def finish(run: Run, state: TrainState, reason: StopReason, train_seconds: float,
           rung_value: float = math.nan) -> RunResult:
    """The final full passes, the run's final metrics, tags and artifacts, and the result."""
    te = time.perf_counter()
    kept = state.best_state is not None  # None: diverged before the first evaluation, nothing to keep
    nothing = EvalResult(loss=math.nan, chars=0)
    # pruned, or paused at a rung: the full passes would score weights nobody may use; stopped by
    # the study's deadline: its value is its val-slice best, and the full passes would overrun it
    tested = kept and reason not in (StopReason.PRUNED, StopReason.RUNG_END, StopReason.DEADLINE)
    val, test, mixed = final_evaluation(run, state) if tested else (nothing, nothing, {})
    final_eval_seconds = time.perf_counter() - te if tested else 0.0
    stop = state.stop
    early_stop_step = stop.stopped_at if reason is StopReason.EARLY_STOP else None
    final = {
        "best_val_loss": val.loss, "best_val_bpc": val.bpc, "best_val_perplexity": val.perplexity,
        "test_loss": test.loss, "test_bpc": test.bpc, "test_perplexity": test.perplexity,
        "stopped_early": float(reason is StopReason.EARLY_STOP), "train_seconds": train_seconds,
        "eval_seconds": state.eval_seconds, "eval_share": state.eval_seconds / max(train_seconds, 1e-9),
        "final_eval_seconds": final_eval_seconds, "steps": state.step, "fit_seconds": run.fit_seconds, **mixed,
        "slice_val_loss": min(stop.best, rung_value) if math.isfinite(rung_value) else stop.best,
        **({"rung_value": rung_value} if math.isfinite(rung_value) else {}),
        **({"best_step": stop.best_step} if stop.best_step is not None else {}),
        **({"early_stop_step": early_stop_step} if early_stop_step is not None else {}),
    }
    tracker = run.tracker
    tracker.log_metrics({k: v for k, v in final.items() if math.isfinite(v)}, step=state.step)
    tracker.set_tags({"stop_reason": reason, "model_kind": run.cfg.model.kind})
    tracker.flush()
    if kept:
        log_best_model(run, state)  # a promoted trial may end its rung without a new best
    if tested:
        _log_sample(run)
    if state.history:
        tracker.log_artifact(loss_curve(state.history, stop.best_step, early_stop_step,
                                        tracker.workdir / "loss_curve.png"))
    return RunResult(
        best_val_loss=val.loss, test_loss=test.loss, best_step=stop.best_step, stop_reason=reason,
        steps=state.step, early_stop_step=early_stop_step, train_seconds=train_seconds,
        eval_seconds=state.eval_seconds, n_params=run.n_params, checkpoint=run.ckpt_path if kept else None,
        run_id=tracker.run_id, history=state.history, final_eval_seconds=final_eval_seconds, mixture=mixed,
        slice_val_loss=final["slice_val_loss"], rung_value=rung_value, finish_seconds=time.perf_counter() - te)


def _log_sample(run: Run) -> None:
    cfg, vocab = run.cfg, run.corpus.vocab
    if cfg.train.sample_chars <= 0:
        return
    start = torch.tensor([[vocab.index.get("\n", 0)]], device=run.device)
    gen = torch.Generator(device=run.device).manual_seed(cfg.train.seed)
    out = generate(run.model, start, cfg.train.sample_chars, temperature=0.8, generator=gen)
    path = run.tracker.workdir / "sample.txt"
    path.write_text(vocab.decode(out[0].tolist()), encoding="utf-8")
    run.tracker.log_artifact(path)
