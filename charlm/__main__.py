"""Command line: ``python -m charlm train | sweep | best | eval | sample | report | dashboard``. Thin: parse,
call the Python API (charlm/api.py), print.

User errors (bad config, missing files, unknown characters) print one line to stderr and exit 2;
Ctrl-C or SIGTERM ends the MLflow run as KILLED and exits 130/143.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from charlm import interrupts
from charlm.errors import CharlmError, first_line
from charlm.paths import DEFAULT_MODEL, redact


def cmd_train(args) -> int:
    from charlm import api, config

    if args.dry_run:
        cfg, corpus = api.experiment(args.experiment, args.set or [])
        sys.stdout.write(config.dump_yaml(cfg))
        print(f"# data: {corpus.path.name}, {len(corpus.data):,} characters, {len(corpus.vocab)} distinct; "
              f"splits {len(corpus.train):,}/{len(corpus.val):,}/{len(corpus.test):,}; nothing trained",
              file=sys.stderr)
        return 0
    run = api.train(args.experiment, args.set or [], track=not args.no_track, out=args.out,
                    discard_corrupt_state=args.discard_corrupt_state)
    result = run.result
    where = run.checkpoint or ("not kept (use --out DIR, or drop --no-track to keep it in MLflow)" if args.no_track
                               else "none")
    print(f"{run.config.model.kind}: {result.n_params:,} params, {result.steps} steps in {result.train_seconds:.0f}s, "
          f"stop: {result.stop_reason}")
    print(f"best val loss {result.best_val_loss:.4f} nats/char ({result.best_val_bpc:.4f} bpc) at step "
          f"{result.best_step}; test loss {result.test_loss:.4f} ({result.test_bpc:.4f} bpc)")
    print(f"checkpoint: {where}")
    return 0 if result.stop_reason != "diverged" else 1


def _read_text_arg(path: str) -> str:
    from charlm.data import DataError, read_text, text_file

    text = read_text(text_file(path, "--text", "to score"))
    if len(text) < 2:
        raise DataError(f"Text file {path} has fewer than 2 characters; nothing to score")
    return text


def _model(args):
    """The model ``--model`` names; where a folder left the pick to ``checkpoint.resolve`` (the newest
    ``mlruns/best/<study>/``), say which one, so a smoke model is never taken for the study's."""
    from charlm import api

    model = api.load(args.model, args.device)
    given = Path(args.model).expanduser()
    if given.is_dir() and model.path.parent != given:
        print(f"model: {model.path} (the newest under {args.model}; --model chooses another)", file=sys.stderr)
    return model


def cmd_eval(args) -> int:
    model = _model(args)
    if args.text:
        res = model.evaluate(_read_text_arg(args.text), skip_unknown=args.skip_unknown)
        source = args.text
    else:
        res = model.evaluate(split=args.split)
        from charlm.data import DEFAULT_NAME

        source = f"{Path(model.config.data.path).name or DEFAULT_NAME}:{args.split}"
    if args.json:
        print(json.dumps({**res.as_dict(), "model": str(model.path), "text": source}))
    else:
        print(f"{source}: {res.loss:.4f} nats/char, {res.bpc:.4f} bpc, perplexity {res.perplexity:.3f} "
              f"over {res.chars:,} characters")
    return 0


def cmd_sample(args) -> int:
    _check_sample_args(args)
    model = _model(args)
    prompt = args.prompt or "\n"
    shown = model.vocab.decode(model.vocab.encode(prompt, skip_unknown=args.skip_unknown).tolist())
    text = model.generate(args.prompt, args.chars, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                          skip_unknown=args.skip_unknown)
    sys.stdout.write(shown + text + "\n")
    return 0


def _check_sample_args(args) -> None:
    import math

    if args.chars < 0:
        raise CharlmError(f"--chars must be >= 0, got {args.chars}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CharlmError(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise CharlmError(f"--top-k must be an integer >= 1 (leave it out to sample from every character), "
                          f"got {args.top_k}")


STARTED = time.time()  # the moment the command began: a --budget counts from here


def _load(args, **extra):
    from charlm.api import sweep_spec

    return sweep_spec(args.sweep, storage=args.storage, budget=getattr(args, "budget", None),
                      text=getattr(args, "text", None), **extra)


def cmd_sweep(args) -> int:
    from charlm import api

    out = api.sweep(args.sweep, workers=args.workers, n_trials=args.n_trials, storage=args.storage, budget=args.budget,
                    text=args.text, seed=args.seed, warm_start=args.warm_start, dry_run=args.dry_run,
                    started_at=STARTED, worker_index=args.worker_index)
    if args.dry_run:
        print(out)
    return 0


def cmd_best(args) -> int:
    from charlm import api

    api.best(args.sweep, seeds=args.seeds, storage=args.storage, budget=args.budget, text=args.text, trial=args.trial,
             minutes=args.minutes, started_at=STARTED, discard_corrupt_state=args.discard_corrupt_state)
    return 0


def _study(args):
    from charlm.storage import open_planned, storage_url

    spec = _load(args)
    url = storage_url(spec)
    spec, study = open_planned(spec, url)
    return spec, study, url


def cmd_report(args) -> int:
    from charlm.report import log_report, write_report

    spec, study, _ = _study(args)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    path = log_report(spec, study, parent) if parent else write_report(spec, study)
    print(f"wrote {path}" + (f" and logged it to the study's parent run {parent}" if parent else ""))
    return 0


def cmd_dashboard(args) -> int:
    from optuna_dashboard import run_server

    from charlm.paths import redact
    from charlm.storage import artifact_store, open_storage

    spec, _, url = _study(args)
    # read-only: SIGTERM ends it at once (raised inside a request, wsgiref would swallow it)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"optuna-dashboard for study '{spec.study.name}' ({redact(url)}) on http://{args.host}:{args.port}", flush=True)
    # the store the sweep uploaded each trial's loss curve to
    run_server(open_storage(url), host=args.host, port=args.port, artifact_store=artifact_store(spec.study.name))
    return 0


class _Parser(argparse.ArgumentParser):
    """Argument errors as every other error: one line naming the problem and where the help is, exit 2."""

    def error(self, message: str):
        print(f"error: {_one_line(message)} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _command(sub, name: str, func, help: str, *examples: str) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help=help, epilog="example:\n" + "\n".join(f"  {x}" for x in examples),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.set_defaults(func=func)
    return c


def _study_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("sweep", nargs="?", default="sweeps/default.yaml", help="sweep YAML (default sweeps/default.yaml)")
    c.add_argument("--storage", default=None, metavar="URL", help="Optuna storage URL (overrides study.storage)")
    c.add_argument("--text", default=None, metavar="FILE",
                   help="model this UTF-8 text instead of the base experiment's (its own study, split and model)")


def _budget_arg(c: argparse.ArgumentParser, what: str) -> None:
    c.add_argument("--budget", default=None, metavar="DURATION",
                   help=f"wall-clock budget of sweep + best, e.g. 45m, 3h, 1h30m: {what} (overrides study.budget)")


def _discard_arg(c: argparse.ArgumentParser) -> None:
    c.add_argument("--discard-corrupt-state", action="store_true",
                   help="a saved training state that cannot be read is deleted and its run starts over "
                        "(without this flag: one line naming the file, and nothing changed)")


def _model_args(c: argparse.ArgumentParser, skip: str) -> None:
    c.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH",
                   help=f"checkpoint file or folder holding one (default {DEFAULT_MODEL})")
    c.add_argument("--skip-unknown", action="store_true", help=skip)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _study_commands(sub) -> None:
    w = _command(sub, "sweep", cmd_sweep, "run (or resume) the Optuna study a sweep YAML declares",
                 "python -m charlm sweep sweeps/smoke.yaml --workers 2",
                 "python -m charlm sweep sweeps/default.yaml --storage postgresql://charlm@dbhost/optuna")
    _study_args(w)
    w.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine (default 1)")
    w.add_argument("--n-trials", type=int, default=None, help="total trials for the study (overrides study.n_trials)")
    w.add_argument("--dry-run", action="store_true",
                   help="print the resolved space, the plan (measured here) and the queued trials; train nothing")
    _budget_arg(w, "plans the study and the retrain to it and keeps the study's deadline")
    w.add_argument("--seed", type=int, default=None, help="sampler seed (overrides sampler.seed)")
    w.add_argument("--warm-start", default=None, metavar="STUDY",
                   help="queue the best trials of an earlier study in the same storage first")
    w.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    b = _command(sub, "best", cmd_best,
                 "retrain the study's best trial at its clock (or what --budget leaves) over seeds, test, save and register it",
                 "python -m charlm best sweeps/default.yaml --seeds 0 1")
    _study_args(b)
    b.add_argument("--seeds", type=int, nargs="+", default=None, help="override best.seeds")
    _budget_arg(b, "each seed's clock is what the deadline leaves (the sweep's, after `sweep --budget`)")
    b.add_argument("--trial", type=int, default=None, metavar="N",
                   help="retrain trial N instead of the winner (saved to mlruns/best/<study>-trial-N/, not registered)")
    b.add_argument("--minutes", type=float, default=None, help="each seed's training clock, in minutes")
    _discard_arg(b)
    r = _command(sub, "report", cmd_report, "write a Markdown report of a study (mlruns/reports/<study>/) and log it",
                 "python -m charlm report sweeps/smoke.yaml")
    _study_args(r)
    d = _command(sub, "dashboard", cmd_dashboard, "optuna-dashboard over a study's storage (127.0.0.1 unless --host)",
                 "python -m charlm dashboard sweeps/default.yaml --port 8080")
    _study_args(d)
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080)")


def _model_commands(sub) -> None:
    e = _command(sub, "eval", cmd_eval, "score a text with a checkpoint (full-pass protocol)",
                 "python -m charlm eval --model mlruns/best/default --split test --json")
    _model_args(e, "drop characters outside the model's vocabulary instead of failing")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="UTF-8 text file to score")
    src.add_argument("--split", choices=["train", "val", "test"], help="a split of the checkpoint's own corpus")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    s = _command(sub, "sample", cmd_sample, "generate text from a checkpoint",
                 "python -m charlm sample --model mlruns/best --prompt 'ROMEO:' --chars 300")
    _model_args(s, "drop prompt characters outside the vocabulary")
    s.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    s.add_argument("--chars", type=int, default=500, help="characters to generate (default 500)")
    s.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=None, help="sample only among the K likeliest characters")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m charlm", description="Character-level language models, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = _command(sub, "train", cmd_train, "train one model from an experiment YAML",
                 "python -m charlm train experiments/gpt.yaml --set train.max_steps=500 model.n_layer=2",
                 "python -m charlm train experiments/gpt.yaml --dry-run")
    t.add_argument("experiment", help="experiment YAML, e.g. experiments/gpt.yaml")
    t.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="override config keys: --set train.lr=1e-3 model.n_layer=2 (the flag may also repeat)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the config and the data, print the resolved config; train nothing")
    t.add_argument("--out", metavar="DIR", help="also save the best checkpoint as DIR/model.pt")
    t.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    _discard_arg(t)
    _study_commands(sub)
    _model_commands(sub)
    return p


def _one_line(message: str) -> str:
    """A message naming a path or value that holds a line break stays one line: the break is shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupts.install()  # SIGTERM/Ctrl-C unwind through `with tracker`, which records KILLED
    try:
        return args.func(args)
    except CharlmError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Exception as e:  # a store, server or disk that failed where no check of charlm's stood
        from charlm.tracking import outside

        if not outside(e):
            raise
        first = first_line(e, 300)
        where = f" {e.filename}:" if isinstance(e, OSError) and e.filename else ""
        print(_one_line(f"error:{where} {type(e).__name__}: {redact(first)}; what finished is kept in the stores: "
                        "fix that and run the command again"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
