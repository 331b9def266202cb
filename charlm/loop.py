"""The optimisation loop, the :class:`Run` it works on and the :class:`TrainState` it changes.

Every ``validation_interval`` steps (and at the last step or when the clock runs out) an evaluation
on the fixed val slice feeds the patience rule, keeps the best weights, saves the whole state for
an exact resume (or, in a run that keeps no state, the best checkpoint; see :meth:`Loop.persist`),
and asks ``on_eval`` whether to stop. A ``wsd`` run that runs out of patience at
its peak learning rate decays first (over ``decay_fraction`` of its steps so far, as a rung's
preview does) and stops after: stopped at the peak it would keep weights no decayed run is
judged by.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from charlm import checkpoint
from charlm.config import Config, to_dict
from charlm.data import Batcher, Corpus
from charlm.errors import CorruptState
from charlm.evaluate import EvalResult, full_pass
from charlm.models.base import CharModel
from charlm.optim import decayed, lr_at
from charlm.progress import Progress
from charlm.stopping import Patience
from charlm.tracking import Tracker


class StopReason(StrEnum):
    """Why a run stopped; logged as the run's ``stop_reason`` tag."""

    EARLY_STOP = "early_stop"  # the patience rule fired (after the wsd decay, where there was one)
    MAX_STEPS = "max_steps"  # the run used its max_steps
    MAX_MINUTES = "max_minutes"  # the run used its max_minutes of training clock
    DIVERGED = "diverged"  # loss not finite, or above twice a uniform guess
    FITTED = "fitted"  # a count model (ngram): nothing to optimise
    PRUNED = "pruned"  # on_eval said so (the sweep's pruner)
    RUNG_END = "rung_end"  # the sweep's rung budget (``until``) is spent: promote or pause (charlm/promotion.py)
    DEADLINE = "deadline"  # the study's deadline (``stop_at``) passed: stopped at once, its best value kept
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    ERROR = "error"  # an exception (set by the sweep on the trial's run)


@dataclass(frozen=True)
class EvalEvent:
    """What the ``on_eval`` hook is told after each intermediate evaluation."""

    step: int
    val_loss: float  # on the fixed val slice (``train.eval_chars``)
    train_loss: float  # mean training loss since the previous evaluation
    best_val_loss: float
    lr: float
    tokens_per_sec: float
    elapsed: float  # training seconds so far, evaluations included: the sweep's compute axis


@dataclass
class Run:
    """What one training works on, built once by :func:`setup`."""

    cfg: Config
    tracker: Tracker
    corpus: Corpus
    device: str
    model: CharModel
    amp: torch.autocast | None
    optimizer: torch.optim.Optimizer | None  # None: nothing to optimise (a count model)
    batches: Batcher
    n_params: int
    fit_seconds: float
    compiled: torch.nn.Module | None = None  # the model through torch.compile for training steps (train.compile)
    cuda_graphs: bool = False  # the compiled step replays as CUDA graphs (train.compile_mode)
    saved_step: int | None = None  # the step of the weights at ckpt_path, written by this process (None: none yet)

    @property
    def ckpt_path(self) -> Path:
        return self.tracker.workdir / "model" / checkpoint.FILENAME

    def val_slice(self) -> torch.Tensor:
        """What intermediate evaluations score: the first ``train.eval_chars`` of val (0: all of it)."""
        n = self.cfg.train.eval_chars
        return self.corpus.val[:n] if n else self.corpus.val

    def score(self, ids: torch.Tensor, amp: torch.autocast | None = None) -> EvalResult:
        t = self.cfg.train
        return full_pass(self.model, ids, t.eval_stride, t.eval_batch_size, self.device, amp)

    def save_checkpoint(self, meta: dict) -> None:
        """The model's weights as they are now, as the checkpoint of step ``meta["step"]``."""
        checkpoint.save(self.ckpt_path, self.model, self.cfg, self.corpus.vocab,
                        {"data_sha256": self.corpus.sha256, "n_params": self.n_params, "seed": self.cfg.train.seed,
                         **meta})
        self.saved_step = meta["step"]


STATE_FORMAT = "charlm-train-state/3"  # /3: the best weights left out when they are the model's
READABLE_STATES = ("charlm-train-state/2", STATE_FORMAT)


@dataclass
class TrainState:
    """Everything the loop changes. Saved with the model, optimizer and RNGs at each evaluation;
    restored only by a run of the exact same config."""

    stop: Patience
    step: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # the best weights so far
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    eval_seconds: float = 0.0
    elapsed: float = 0.0  # training seconds up to the last save
    cooldown_from: int = 0  # wsd out of patience at its peak: the step its decay began, and its length
    cooldown_steps: int = 0

    @property
    def at_best(self) -> bool:
        """This step's evaluation is the best so far: the model's weights are the best weights."""
        return self.stop.best_step == self.step

    def save(self, path: Path, run: Run) -> None:
        """Written at every evaluation, so it costs what it writes: the best weights are not written
        twice when they are the model's (a new best at this evaluation: usual while a run improves),
        and no fsync (a state lost with the machine costs a redone stretch; a torn one is refused)."""
        loop = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stop"}
        best_is_model = self.best_state is not None and self.at_best
        if best_is_model:
            loop["best_state"] = None
        blob = {"format": STATE_FORMAT, "config": to_dict(run.cfg), "loop": loop, "best_is_model": best_is_model,
                "patience": dataclasses.asdict(self.stop), "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(), "batch_rng": run.batches.gen.get_state(),
                "torch_rng": torch.get_rng_state(),  # dropout on a GPU draws from its own generators
                # the run's GPU alone: a worker sees one GPU, a coordinator on a many-GPU host sees all
                "cuda_rng": torch.cuda.get_rng_state() if run.device == "cuda" else None}
        checkpoint.write_atomic(Path(path), lambda f: torch.save(blob, f), durable=False)

    @classmethod
    def load(cls, path: Path | None, run: Run, discard_corrupt: bool = False) -> TrainState | None:
        """The state saved at ``path`` restored into ``run``, or None (absent, or another config's).
        A file that cannot be read (cut short, overwritten) is a :class:`CorruptState`, one line
        naming it; with ``discard_corrupt`` (the user's consent: ``--discard-corrupt-state``) it is
        deleted and the run starts over. Never silently."""
        if path is None or not Path(path).is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or "format" not in blob:
                raise ValueError("not a training state")
        except Exception as e:  # torch raises many types for a file cut short or overwritten
            if discard_corrupt:
                print(f"discarded the unreadable training state {path} ({type(e).__name__}); starting over",
                      file=sys.stderr)
                Path(path).unlink(missing_ok=True)
                return None
            raise CorruptState(f"The training state {path} cannot be read ({type(e).__name__}); to start that run "
                               "over, run the command again with --discard-corrupt-state (or delete the file)") from None
        if blob.get("format") not in READABLE_STATES or blob.get("config") != to_dict(run.cfg):
            return None
        run.model.load_state_dict(blob["model"])
        run.optimizer.load_state_dict(blob["optimizer"])
        run.batches.gen.set_state(blob["batch_rng"])
        torch.set_rng_state(blob["torch_rng"])
        cuda_rng = blob.get("cuda_rng")
        if isinstance(cuda_rng, list):  # saved as one state per visible GPU: the run's was the first
            cuda_rng = cuda_rng[0] if cuda_rng else None
        if cuda_rng is not None and run.device == "cuda":
            torch.cuda.set_rng_state(cuda_rng)
        if blob.get("best_is_model"):
            blob["loop"]["best_state"] = blob["model"]
        return cls(stop=Patience(**blob["patience"]), **blob["loop"])


class LossMeter:
    """Training losses since the last evaluation. On CUDA (``sync=False``) the sum stays on the
    device and is read at evaluations only, so no step waits for the GPU to finish the one before;
    a loss that is not finite is then caught at the next evaluation instead of at its own step."""

    def __init__(self, sync: bool):
        self.sync = sync
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, loss: torch.Tensor) -> bool:
        """Count one step's loss; False when it is known now not to be finite (``sync`` only)."""
        if self.sync:
            value = loss.item()
            if not math.isfinite(value):
                return False
            self.total += value
        else:
            self.total = self.total + loss.detach().float()
        self.count += 1
        return True

    def mean(self) -> float | None:
        """The mean since the last call (None without a step), then start over."""
        if not self.count:
            return None
        mean = float(self.total) / self.count
        self.total, self.count = 0.0, 0
        return mean


class Loop:
    """The optimisation loop over one :class:`Run`, changing only its :class:`TrainState`."""

    def __init__(self, run: Run, state: TrainState, on_eval, state_path: Path | None, until: float | None = None,
                 stop_at: float | None = None):
        self.run, self.state, self.on_eval, self.state_path = run, state, on_eval, state_path
        self.until = until  # training seconds at which this rung ends (a sweep's promotion), or None
        self.stop_at = stop_at  # epoch seconds: the study's deadline; the step past it evaluates and stops
        self.t0 = time.perf_counter() - state.elapsed  # the clock budget and the schedule carry on
        self.losses = LossMeter(sync=run.device != "cuda")
        self.compile_seconds: float | None = None  # the first compiled step's, which compiles it
        self.window = (time.perf_counter(), 0)  # (since, tokens) for tokens/s between evaluations
        # Worse than twice a uniform guess is no longer training (lr=10 lands near 10 nats, not at NaN)
        self.diverged_above = 2 * math.log(len(run.corpus.vocab))

    def diverged(self, val_loss: float) -> bool:
        return not math.isfinite(val_loss) or val_loss > self.diverged_above

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def until_stop(self, progress: bool) -> StopReason:
        """Train until a budget, the patience rule, divergence or ``on_eval`` stops it; say which."""
        run, state, t = self.run, self.state, self.run.cfg.train
        if run.optimizer is None:  # nothing to optimise: one evaluation of the fitted model
            self.evaluate(0.0, len(run.corpus.train) / max(run.fit_seconds, 1e-9))
            return StopReason.FITTED
        if state.stop.should_stop and not self.cooling():  # resumed from the evaluation that ran out of patience
            return StopReason.EARLY_STOP
        bar = Progress(f"train {run.cfg.name or run.cfg.model.kind}", None if t.clock_only else t.max_steps, "step",
                       enabled=progress, initial=state.step)
        run.model.train()
        try:
            while state.step < t.max_steps:
                lr = self.lr()
                if not self.step(lr):
                    return StopReason.DIVERGED
                bar.advance()
                now = self.elapsed()
                out_of_time = t.max_minutes > 0 and now >= t.max_minutes * 60
                rung_end = self.until is not None and now >= self.until and not self.cooling()
                cooled = self.cooling() and state.step >= state.cooldown_from + state.cooldown_steps
                late = self.stop_at is not None and time.time() >= self.stop_at
                if (state.step % t.validation_interval == 0 or state.step == t.max_steps or out_of_time or rung_end
                        or cooled or late):
                    reason = self.after_evaluation(lr, bar, out_of_time)
                    if reason is not None:
                        return reason
                    if late:
                        return StopReason.DEADLINE
                    if cooled:
                        return StopReason.EARLY_STOP
                    if rung_end and not self.cooling():
                        return StopReason.RUNG_END
            return StopReason.MAX_STEPS
        finally:
            bar.close()

    def lr(self) -> float:
        state, t = self.state, self.run.cfg.train
        if self.cooling():
            return decayed(t.lr, t.lr * t.min_lr_ratio, state.step - state.cooldown_from + 1, state.cooldown_steps)
        return lr_at(state.step, self.run.cfg, self.elapsed())

    def cooling(self) -> bool:
        return self.state.cooldown_steps > 0

    def start_cooldown(self) -> bool:
        """Out of patience: a wsd run still at its peak decays before it stops (True); any other stops now."""
        state, t = self.state, self.run.cfg.train
        if t.schedule != "wsd" or self.cooling() or lr_at(state.step, self.run.cfg, self.elapsed()) < t.lr:
            return False
        state.cooldown_from, state.cooldown_steps = state.step, self.decay_steps()
        return True

    def decay_steps(self) -> int:
        """How long an early wsd decay from here lasts: ``decay_fraction`` of the steps so far."""
        return max(1, round(self.run.cfg.train.decay_fraction * self.state.step))

    def preview(self) -> float:
        """The val-slice loss of a copy whose learning rate decays to the floor over the last
        ``decay_fraction`` of as many steps again; the run then carries on from the state saved at
        this evaluation, as if the copy had never trained (its seconds are not on the clock)."""
        run, state, t = self.run, self.state, self.run.cfg.train
        step, lr, floor = state.step, lr_at(state.step, run.cfg, self.elapsed()), t.lr * t.min_lr_ratio
        n = self.decay_steps()
        for i in range(1, n + 1):
            if not self.step(decayed(lr, floor, i, n)):
                break
        loss = run.score(run.val_slice(), run.amp).loss
        if TrainState.load(self.state_path, run) is None:  # model, optimizer and RNGs as saved
            raise RuntimeError(f"cannot restore the state saved at {self.state_path} after a preview")
        state.step = step
        self.losses.mean()  # the copy's steps are not the run's
        return loss if math.isfinite(loss) else math.inf

    def step(self, lr: float) -> bool:
        """One optimizer update; False (and no update) when the loss is known not to be finite
        (at once on CPU; on CUDA at the next evaluation, see :class:`LossMeter`)."""
        run = self.run
        first_compiled = run.compiled is not None and self.compile_seconds is None
        t0 = time.perf_counter()
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        x, y = run.batches.next()
        if run.cuda_graphs:  # a new step: the last one's graph outputs (its loss, already summed) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with run.amp or contextlib.nullcontext():
            _, loss = (run.compiled if run.compiled is not None else run.model)(x, y)
        self.state.step += 1
        if not self.losses.add(loss):
            return False
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
        run.optimizer.step()
        if first_compiled:  # compiling happens in the first call, on the trial's clock
            self.compile_seconds = time.perf_counter() - t0
            run.tracker.log_metrics({"compile_seconds": self.compile_seconds}, step=self.state.step)
        self.window = (self.window[0], self.window[1] + run.cfg.train.batch_size * run.batches.length)
        return True

    def after_evaluation(self, lr: float, bar: Progress, out_of_time: bool) -> StopReason | None:
        """Evaluate, save the state, show it, and say whether (and why) to stop."""
        state = self.state
        tokens_per_sec = self.window[1] / max(1e-9, time.perf_counter() - self.window[0])
        row, fired = self.evaluate(lr, tokens_per_sec)
        decaying = self.cooling() or (fired and self.start_cooldown())  # decided before the save resumes it
        self.persist()
        self.run.tracker.flush()  # after the save: a store that fails here leaves this evaluation resumable
        train_loss, val_loss, best = row.get("train_loss", math.nan), row["val_loss"], state.stop.best
        t = self.run.cfg.train
        where = (f"{state.step} at {self.elapsed() / 60:.2f}/{t.max_minutes:.2f} min" if t.clock_only
                 else f"{state.step}/{t.max_steps}")
        bar.event(f"step {where} loss {train_loss:.4f} val {val_loss:.4f} "
                  f"(best {best:.4f}) {tokens_per_sec / 1000:.1f}k tok/s", loss=f"{train_loss:.4f}",
                  val=f"{val_loss:.4f}", best=f"{best:.4f}", tok_s=f"{tokens_per_sec / 1000:.1f}k")
        self.window = (time.perf_counter(), 0)
        if self.diverged(val_loss) or ("train_loss" in row and not math.isfinite(train_loss)):
            return StopReason.DIVERGED
        reason = None
        if self.on_eval is not None:
            reason = self.on_eval(EvalEvent(state.step, val_loss, train_loss, best, lr, tokens_per_sec,
                                            row["train_seconds"]))
        if decaying:  # out of patience, its decay under way: neither the pruner nor a rung stops it, only the clock
            return StopReason.EARLY_STOP if out_of_time else None
        if fired:  # its own patience ran out: an early stop, even when the pruner fired at this evaluation too
            return StopReason.EARLY_STOP
        if reason:
            return StopReason(reason)
        return StopReason.MAX_MINUTES if out_of_time else None

    def persist(self) -> None:
        """What an evaluation writes. A run with a ``state_path`` (a sweep's trial, a ``best`` seed)
        saves its whole state, best weights included, so its checkpoint is written once, when the
        run logs it (charlm/trainer.py ``log_best_model``); a run without one writes its checkpoint at
        each new best, so a kill still leaves the best so far."""
        run, state = self.run, self.state
        if self.state_path is not None:
            state.elapsed = self.elapsed()
            state.save(self.state_path, run)
        elif state.best_state is not None and state.at_best:
            run.save_checkpoint({"step": state.step, "slice_val_loss": state.stop.best})

    def evaluate(self, lr: float, tokens_per_sec: float) -> tuple[dict, bool]:
        """One intermediate evaluation on the val slice: the patience rule, the best weights (kept in
        memory; :meth:`persist` writes them), the logged row (``train_loss`` is the mean since the
        previous evaluation). True when patience ran out."""
        run, state = self.run, self.state
        te = time.perf_counter()
        val = run.score(run.val_slice(), run.amp)
        state.eval_seconds += time.perf_counter() - te
        if self.diverged(val.loss):  # never the best: a trial keeps the weights from before it diverged
            fired = False
        else:
            fired = state.stop.update(state.step, val.loss)
        if state.at_best:
            state.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        row = {"val_loss": val.loss, "val_perplexity": val.perplexity, "val_bpc": val.bpc, "lr": lr,
               "tokens_per_sec": tokens_per_sec, "train_seconds": self.elapsed()}  # the compute axis, beside step
        train_loss = self.losses.mean()
        if train_loss is not None:
            row["train_loss"] = train_loss
        state.history.append({"step": state.step, **row})
        run.tracker.log_metrics(row, step=state.step)  # sent after the state is saved (after_evaluation)
        return row, fired
