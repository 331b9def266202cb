"""``train(cfg, tracker, on_eval=None) -> RunResult``: one run, from config to tested checkpoint.

AdamW (decay on matrices only), warmup then decay, gradient clipping, step and wall-clock budgets,
an evaluation every ``validation_interval`` steps feeding the patience rule, best weights restored
at the end, then full-pass val and test evaluations. The one hook, ``on_eval``, sees every
evaluation and may return a stop reason (the sweep returns ``"pruned"``). With ``state_path`` the
whole training state (weights, optimizer moments, step, best weights, patience, batch order, clock)
is written there atomically at every evaluation, and a later call with the same config resumes from
it instead of starting over (``make best`` uses this for a seed that was interrupted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from charlm import checkpoint, progress
from charlm.config import Config, dump_yaml, flatten, to_dict
from charlm.data import Batcher, Corpus, load_corpus
from charlm.evaluate import EvalResult, full_pass
from charlm.models import build_model, count_params, generate
from charlm.progress import Progress
from charlm.stopping import Patience
from charlm.tracking import git_commit


@dataclass(frozen=True)
class EvalEvent:
    """What the ``on_eval`` hook is told after each intermediate evaluation."""

    step: int
    val_loss: float  # on the fixed val slice (``train.eval_chars``)
    train_loss: float  # mean training loss since the previous evaluation
    best_val_loss: float
    lr: float
    tokens_per_sec: float
    elapsed: float  # seconds since training started


@dataclass
class RunResult:
    best_val_loss: float  # full pass over val with the restored best weights
    test_loss: float  # full pass over test with the same weights
    best_step: int | None
    stop_reason: str  # early_stop | max_steps | max_minutes | diverged | fitted (count models) | on_eval's reason
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

    @property
    def best_val_bpc(self) -> float:
        return self.best_val_loss / math.log(2)

    @property
    def test_bpc(self) -> float:
        return self.test_loss / math.log(2)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from charlm.errors import CharlmError

        raise CharlmError("train.device=cuda but torch sees no GPU; use train.device=auto or cpu")
    return name


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(precision: str, device: str) -> torch.autocast | None:
    """bf16 autocast when asked, or on ``auto`` where the hardware computes bf16 natively."""
    use = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if use else None


def lr_at(step: int, cfg, elapsed: float = 0.0) -> float:
    """Learning rate for the update with 0-based index ``step``, ``elapsed`` seconds into training.

    The decay follows whichever budget runs out first: with ``max_minutes`` set, a run cut by
    the clock still ends at the low learning rate instead of stopping mid-schedule."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    floor = t.lr * t.min_lr_ratio
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.max_minutes > 0:
        progress = max(progress, elapsed / (t.max_minutes * 60))
    progress = min(1.0, progress)
    if t.schedule == "cosine":
        return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * progress))
    if t.schedule == "linear":
        return t.lr - (t.lr - floor) * progress
    return t.lr


def make_optimizer(model: torch.nn.Module, cfg: Config, device: str) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:  # tied weights appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # fused kernels absent for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kw)


STATE_FORMAT = "charlm-train-state/1"


def _read_state(path: Path | None, cfg: Config) -> dict | None:
    """The saved training state at ``path`` if it exists and was made by this exact config."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a state file cut short cannot be resumed from; start over
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("config") != to_dict(cfg):
        return None
    return state


def train(cfg: Config, tracker, on_eval: Callable[[EvalEvent], str | None] | None = None,
          corpus: Corpus | None = None, state_path: Path | None = None) -> RunResult:
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    corpus = corpus or load_corpus(cfg.data)
    model = build_model(cfg, len(corpus.vocab)).to(device)
    n_params = count_params(model)
    amp = autocast_for(cfg.train.precision, device)
    t_fit = time.perf_counter()
    if hasattr(model, "fit"):  # count-based models (ngram) learn from the whole split in one pass
        model.fit(corpus.train)
    fit_seconds = time.perf_counter() - t_fit
    trainable = any(p.requires_grad for p in model.parameters())
    optimizer = make_optimizer(model, cfg, device) if trainable else None
    batches = Batcher(corpus.train, cfg.data.context, cfg.train.batch_size, cfg.train.seed, device)
    eval_data = corpus.val[: cfg.train.eval_chars] if cfg.train.eval_chars else corpus.val
    tokens_per_step = cfg.train.batch_size * batches.length

    tracker.log_params({
        **flatten(cfg),
        "model_kind": cfg.model.kind,
        "n_params": n_params,
        "data_sha256": corpus.sha256,
        "data_file": corpus.path.name,
        "vocab_size": len(corpus.vocab),
        "git_commit": git_commit(),
        "device": device,
        "amp": "bf16" if amp else "fp32",
        "torch_threads": torch.get_num_threads(),
    })
    tracker.log_dataset(corpus)
    if cfg.train.system_metrics:
        tracker.start_system_metrics()
    (tracker.workdir / "config.yaml").write_text(dump_yaml(cfg))
    tracker.log_artifact(tracker.workdir / "config.yaml")
    ckpt_path = tracker.workdir / "model" / checkpoint.FILENAME

    stop = Patience(cfg.train.patience, cfg.train.min_relative_improvement)
    resumed = _read_state(state_path, cfg) if trainable else None
    # Worse than twice a uniform guess is no longer training (lr=10 lands near 10 nats, not at NaN)
    diverged_above = 2 * math.log(len(corpus.vocab))
    history: list[dict] = []
    best_state: dict[str, torch.Tensor] | None = None
    stop_reason = "max_steps"
    train_losses: list[float] = []
    eval_seconds = 0.0
    t0 = time.perf_counter()
    step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        best_state = resumed["best_state"]
        stop = Patience(**resumed["patience"])
        history = resumed["history"]
        step, eval_seconds = resumed["step"], resumed["eval_seconds"]
        t0 -= resumed["elapsed"]  # the clock budget and the schedule carry on where they stopped
        batches.gen.set_state(resumed["batch_rng"])
        torch.set_rng_state(resumed["torch_rng"])
        for row in history:  # this run's curves start at step 0 like any other
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        tracker.set_tags({"resumed_from_step": str(step)})
        if stop.should_stop:  # saved at the evaluation that ran out of patience
            stop_reason = "early_stop"
        print(f"resuming from step {step} (saved state {Path(state_path).name})", flush=True)
    t_window, tokens_window = time.perf_counter(), 0

    def save_state() -> None:
        if state_path is None:
            return
        state = {"format": STATE_FORMAT, "config": to_dict(cfg), "step": step, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "best_state": best_state,
                 "patience": dataclasses.asdict(stop), "history": history,
                 "elapsed": time.perf_counter() - t0, "eval_seconds": eval_seconds,
                 "batch_rng": batches.gen.get_state(), "torch_rng": torch.get_rng_state()}
        checkpoint.write_atomic(Path(state_path), lambda f: torch.save(state, f))

    def evaluate(step: int, lr: float, tokens_per_sec: float) -> tuple[dict, bool]:
        """One intermediate evaluation: metrics, the patience rule, the best checkpoint.
        Returns the logged row (``train_loss`` is the mean since the previous evaluation)."""
        nonlocal best_state, eval_seconds
        te = time.perf_counter()
        val = full_pass(model, eval_data, cfg.train.eval_stride, cfg.train.eval_batch_size, device, amp)
        eval_seconds += time.perf_counter() - te
        fired = stop.update(step, val.loss)
        if stop.best_step == step:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            checkpoint.save(ckpt_path, model, cfg, corpus.vocab, _meta(cfg, corpus, step, val.loss, n_params))
        row = {"val_loss": val.loss, "val_perplexity": val.perplexity, "val_bpc": val.bpc, "lr": lr,
               "tokens_per_sec": tokens_per_sec}
        if train_losses:
            row["train_loss"] = sum(train_losses) / len(train_losses)
            train_losses.clear()
        history.append({"step": step, **row})
        tracker.log_metrics(row, step=step)
        tracker.flush()
        return row, fired

    if not trainable:  # nothing to optimise: one evaluation of the fitted model
        evaluate(0, 0.0, len(corpus.train) / max(fit_seconds, 1e-9))
        stop_reason = "fitted"
    bar = Progress(f"train {cfg.name or cfg.model.kind}", cfg.train.max_steps, "step",
                   enabled=trainable and progress.TRAINING["enabled"], initial=step)
    model.train()
    try:
        while trainable and not stop.should_stop and step < cfg.train.max_steps:
            lr = lr_at(step, cfg, time.perf_counter() - t0)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = batches.next()
            with amp or contextlib.nullcontext():
                _, loss = model(x, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                stop_reason = "diverged"
                step += 1
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            step += 1
            bar.advance()
            train_losses.append(loss_value)
            tokens_window += tokens_per_step
            elapsed = time.perf_counter() - t0
            out_of_time = cfg.train.max_minutes > 0 and elapsed >= cfg.train.max_minutes * 60
            if step % cfg.train.validation_interval == 0 or step == cfg.train.max_steps or out_of_time:
                tokens_per_sec = tokens_window / max(1e-9, time.perf_counter() - t_window)
                row, fired = evaluate(step, lr, tokens_per_sec)
                save_state()
                val_loss = row["val_loss"]
                bar.event(f"step {step}/{cfg.train.max_steps} loss {row.get('train_loss', math.nan):.4f} "
                          f"val {val_loss:.4f} (best {stop.best:.4f}) {tokens_per_sec / 1000:.1f}k tok/s",
                          loss=f"{row.get('train_loss', math.nan):.4f}", val=f"{val_loss:.4f}",
                          best=f"{stop.best:.4f}", tok_s=f"{tokens_per_sec / 1000:.1f}k")
                if not math.isfinite(val_loss) or val_loss > diverged_above:
                    stop_reason = "diverged"
                    break
                if on_eval is not None:
                    reason = on_eval(EvalEvent(step, val_loss, row["train_loss"], stop.best, lr, tokens_per_sec,
                                               time.perf_counter() - t0))
                    if reason:
                        stop_reason = reason
                        break
                if fired:
                    stop_reason = "early_stop"
                    break
                if out_of_time:
                    stop_reason = "max_minutes"
                    break
                t_window, tokens_window = time.perf_counter(), 0
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C / SIGTERM: keep the best checkpoint so far with the run before it ends KILLED
        tracker.set_tags({"stop_reason": "interrupted"})
        if best_state is not None:
            tracker.log_artifact(ckpt_path, "model")
        raise
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    if state_path is not None:  # finished: nothing left to resume
        Path(state_path).unlink(missing_ok=True)

    if best_state is not None:
        model.load_state_dict(best_state)
        te = time.perf_counter()
        mixed = {}
        if hasattr(model, "calibrate"):  # a mixture: the network alone on test, then fit its weight on val
            mixed["network_test_loss"] = full_pass(model, corpus.test, cfg.train.eval_stride,
                                                   cfg.train.eval_batch_size, device).loss
            mixed["mix_weight"] = model.calibrate(corpus.val, stride=cfg.train.eval_stride,
                                                  batch_size=cfg.train.eval_batch_size, device=device)
        val_full = full_pass(model, corpus.val, cfg.train.eval_stride, cfg.train.eval_batch_size, device)
        test_full = full_pass(model, corpus.test, cfg.train.eval_stride, cfg.train.eval_batch_size, device)
        final_eval_seconds = time.perf_counter() - te
        checkpoint.save(ckpt_path, model, cfg, corpus.vocab,
                        {**_meta(cfg, corpus, stop.best_step, stop.best, n_params),
                         "val_loss": val_full.loss, "test_loss": test_full.loss})
    else:  # diverged before the first evaluation: nothing worth keeping
        val_full = test_full = EvalResult(loss=math.nan, chars=0)
        mixed = {}
        final_eval_seconds = 0.0

    final = {
        "best_val_loss": val_full.loss, "best_val_bpc": val_full.bpc, "best_val_perplexity": val_full.perplexity,
        "test_loss": test_full.loss, "test_bpc": test_full.bpc, "test_perplexity": test_full.perplexity,
        "stopped_early": float(stop_reason == "early_stop"), "train_seconds": train_seconds,
        "eval_seconds": eval_seconds, "eval_share": eval_seconds / max(train_seconds, 1e-9),
        "final_eval_seconds": final_eval_seconds, "steps": step, "fit_seconds": fit_seconds,
    }
    final.update(mixed)
    if stop.best_step is not None:
        final["best_step"] = stop.best_step
    if stop.stopped_at is not None and stop_reason == "early_stop":
        final["early_stop_step"] = stop.stopped_at
    tracker.log_metrics({k: v for k, v in final.items() if math.isfinite(v)}, step=step)
    tracker.set_tags({"stop_reason": stop_reason, "model_kind": cfg.model.kind})
    tracker.flush()

    if best_state is not None:
        tracker.log_artifact(ckpt_path, "model")
        _log_sample(model, corpus, cfg, device, tracker)
    _log_curve(history, stop, stop_reason, tracker)
    return RunResult(
        best_val_loss=val_full.loss, test_loss=test_full.loss, best_step=stop.best_step,
        stop_reason=stop_reason, steps=step,
        early_stop_step=stop.stopped_at if stop_reason == "early_stop" else None,
        train_seconds=train_seconds, eval_seconds=eval_seconds, n_params=n_params,
        checkpoint=ckpt_path if best_state is not None else None,
        run_id=getattr(tracker, "run_id", None), history=history, final_eval_seconds=final_eval_seconds,
        mixture=mixed if best_state is not None else {},
    )


def _meta(cfg: Config, corpus: Corpus, step, val_loss: float, n_params: int) -> dict:
    return {"step": step, "slice_val_loss": val_loss, "data_sha256": corpus.sha256,
            "n_params": n_params, "seed": cfg.train.seed}


def _log_sample(model, corpus: Corpus, cfg: Config, device: str, tracker) -> None:
    if cfg.train.sample_chars <= 0:
        return
    start = torch.tensor([[corpus.vocab.index.get("\n", 0)]], device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    out = generate(model, start, cfg.train.sample_chars, temperature=0.8, generator=gen)
    path = tracker.workdir / "sample.txt"
    path.write_text(corpus.vocab.decode(out[0].tolist()), encoding="utf-8")
    tracker.log_artifact(path)


def _log_curve(history: list[dict], stop: Patience, stop_reason: str, tracker) -> None:
    if not history:
        return
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h.get("train_loss", math.nan) for h in history], label="train (mean since last eval)")
    ax.plot(steps, [h["val_loss"] for h in history], label="val (fixed slice)")
    if stop.best_step is not None:
        ax.axvline(stop.best_step, color="green", ls=":", label=f"best step {stop.best_step}")
    if stop_reason == "early_stop" and stop.stopped_at is not None:
        ax.axvline(stop.stopped_at, color="red", ls="--", label=f"early stop {stop.stopped_at}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = tracker.workdir / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    tracker.log_artifact(path)
