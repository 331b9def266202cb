#!/usr/bin/env bash
# One prepared check on one H100/H200-class GPU, inside GPU_CHECK_SECONDS (default 470: under 8
# minutes; 580 when step 5 is asked for):
#   1. speed, while the GPU is idle: bench/gpu_speed.py (the real trainer eager and in each compile
#      mode against a plain compiled PyTorch reference of the same shape, FLOP/s as a share of the
#      measured bf16 peak);
#   2. a 4-trial study of sweeps/gpu.yaml's space (12 s trials, eager, no pruning, no baseline) with 4
#      workers sharing the GPU, then with 1: trials/minute of the chip shared against one at a time
#      (eager, so that compiles, measured in step 5, do not decide it);
#   3. the tests marked gpu (compiled CUDA training in each compile mode, a NaN caught at the next
#      evaluation, a compiled mixture's gate, a resumed GPU random stream, the memory guard of
#      workers sharing a GPU) beside the whole fast suite, as CI
#      runs it on CPU (train.device=auto picks the GPU there; in parallel with pytest-xdist where
#      it is installed, by file);
#   4. with time left: nanoGPT's baby-GPT recipe through `charlm train` on the GPU, tested;
#   5. only when asked (GPU_CHECK_STEPS=5, 9 minutes at worst): the whole study as a user runs it,
#      make sweep SWEEP=sweeps/gpu.yaml WORKERS=4 && make best SWEEP=sweeps/gpu.yaml.
# Needs the project's packages importable (on a bare GPU machine: wheels, docs/how-to/gpu.md) and the
# text: CHARLM_DATA_MIRROR=<folder holding tinyshakespeare.txt>. Each step's output goes to
# ${OUT:-/tmp}/gpu_check.log as well; the last lines are the summary. GPU_CHECK_STEPS="3 2" runs
# only those steps, in that order (a rerun inside what is left of a lease).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(command -v "${PY:-python3}" || echo "$PWD/${PY:-python3}")  # absolute: step 2 runs from a scratch folder
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=${OUT:-/tmp}/gpu_check.log
export PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI= CI=true
order=${GPU_CHECK_STEPS:-1 2 3 4}
# under 8 minutes; with the whole study (step 5) 580 s: its 9 minutes at worst in one 10-minute
# command that also installs the wheels
[[ " $order " == *" 5 "* ]] && default_budget=580 || default_budget=470
BUDGET=${GPU_CHECK_SECONDS:-$default_budget}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
upto() { local s=$(( $(left) - $1 )); echo $(( s > 20 ? s : 20 )); }  # seconds for a step that leaves $1
fail=0
summary=()
step() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
note() { summary+=("$*"); echo "$*" | tee -a "$LOG"; }

# trials/min, failures and compile seconds of study $1 (journal under ./mlruns) that took $3 s with $2 workers
figures() {
  $PY - "$@" 2>&1 <<'PYEOF'
import statistics, sys
import mlflow, optuna
from optuna.trial import TrialState
from charlm.storage import open_storage
from charlm.tracking import tracking_uri
name, workers, took = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
study = optuna.load_study(study_name=name, storage=open_storage(f"journal:mlruns/optuna/{name}.journal"))
done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
# a trial the deadline's SIGTERM stopped is FAIL without an error: it is queued again, not broken
failed = [t.user_attrs["error"] for t in study.trials if t.state == TrialState.FAIL and t.user_attrs.get("error")]
stopped = sum(t.state == TrialState.FAIL and not t.user_attrs.get("error") for t in study.trials)
mlflow.set_tracking_uri(tracking_uri())
runs = mlflow.search_runs(experiment_names=[name])
compiles = runs["metrics.compile_seconds"].dropna().tolist() if "metrics.compile_seconds" in runs else []
print(f"{name}, {workers} worker(s): {len(done)} trials finished in {took / 60:.2f} min = {len(done) / (took / 60):.1f} "
      f"trials/min; {len(failed)} failed {failed[:1]}, {stopped} stopped by the deadline; compile s median "
      f"{statistics.median(compiles) if compiles else float('nan'):.1f} of {len(compiles)}; best val "
      f"{min((t.value for t in done if t.value is not None), default=float('nan')):.4f}")
PYEOF
}

speed() {
step "1. speed, 6x384 context 256 batch 64 bf16"
timeout 220 $PY bench/gpu_speed.py --run-steps 2000 2>&1 | tee -a "$LOG" || fail=1
note "$(grep -E '^\| charlm trainer|^\| reference' "$LOG" | tr -s ' ')"
note "$(grep '^real trainer' "$LOG")"
}

sharing() {
step "2. a 4-trial study from sweeps/gpu.yaml (12 s each, eager, no pruning), 4 workers sharing the GPU, then 1"
for workers in 4 1; do
  [ "$(left)" -gt 40 ] || { note "$workers worker(s): not run, $(left) s left"; fail=1; continue; }
  dir=$(mktemp -d)
  sed "s/n_trials: [0-9]*, timeout_min: [0-9.]*/n_trials: 4/; s/name: gpu,/name: gpu-w$workers,/; s/^pruner: .*/pruner: {type: none}/;
       s/train.max_minutes: [0-9.]* /train.max_minutes: 0.2 /; s/train.compile: auto/train.compile: \"false\"/; /^baseline:/d" sweeps/gpu.yaml > "$dir/gpu.yaml"
  sed -i "s#base: experiments/#base: $PWD/experiments/#" "$dir/gpu.yaml"
  start=$(date +%s)
  (cd "$dir" && timeout $(upto 5) $PY -m charlm sweep gpu.yaml --workers $workers > sweep.log 2>&1) || { fail=1; tail -5 "$dir/sweep.log" | tee -a "$LOG"; }
  took=$(( $(date +%s) - start ))
  note "$(cd "$dir" && figures "gpu-w$workers" "$workers" "$took")"
done
}

tests() {
step "3. tests marked gpu, beside the fast suite"
# by file: a module's fixture (a smoke sweep, an ASHA study) is built once, not once per worker
parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadfile" || echo "")
timeout $(upto 10) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > "${OUT:-/tmp}/gpu_tests.log" 2>&1 &
gpu_tests=$!
timeout $(upto 10) $PY -m pytest -v -p no:cacheprovider $parallel --durations=5 > "${OUT:-/tmp}/fast_suite.log" 2>&1
suite=$?
wait $gpu_tests; gpu_rc=$?
tail -15 "${OUT:-/tmp}/gpu_tests.log" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)" "${OUT:-/tmp}/fast_suite.log" | tee -a "$LOG"
tail -3 "${OUT:-/tmp}/fast_suite.log" | tee -a "$LOG"
note "gpu tests: $(tail -1 "${OUT:-/tmp}/gpu_tests.log") (rc $gpu_rc)"
note "fast suite: $(tail -1 "${OUT:-/tmp}/fast_suite.log") (rc $suite${parallel:+, xdist $parallel})"
[ $gpu_rc = 0 ] && [ $suite = 0 ] || fail=1
}

baby_gpt() {
step "4. nanoGPT's baby GPT (6x384, context 256, batch 64, dropout 0.2, 5000 steps) through charlm train, tested"
if [ "$(left)" -gt 95 ]; then
  dir=$(mktemp -d)
  (cd "$dir" && timeout $(upto 5) $PY -m charlm train "$ROOT/experiments/gpt.yaml" --set model.n_layer=6 \
     --set model.n_head=6 --set model.n_embd=384 --set model.dropout=0.2 --set data.context=256 --set train.batch_size=64 \
     --set train.lr=1e-3 --set train.max_steps=5000 --set train.max_minutes=$(( ($(left) - 30) / 60 )) \
     --set train.patience=0 --set train.validation_interval=250 --set train.eval_batch_size=256 > train.log 2>&1)
  tail -4 "$dir/train.log" | tee -a "$LOG"
  note "baby GPT: $(grep -E 'test loss' "$dir/train.log" | tail -1)"
else
  note "baby GPT: not run, $(left) s left"
fi
}

study() {
step "5. make sweep SWEEP=sweeps/gpu.yaml WORKERS=4 && make best SWEEP=sweeps/gpu.yaml"
log=${OUT:-/tmp}/gpu_study.log
if command -v make > /dev/null; then
  venv=$(dirname "$(dirname "$PY")")  # the python in use, through the Makefile; its install step skipped
  make=(make -s SWEEP=sweeps/gpu.yaml WORKERS=4 VENV="$venv" PY="$PY" -o "$venv/.installed")
  sweep=("${make[@]}" sweep); best=("${make[@]}" best)
else  # an image without make: the two commands its targets run
  note "no make on this machine: the Makefile's commands run as they stand in it"
  sweep=("$PY" -m charlm sweep sweeps/gpu.yaml --workers 4); best=("$PY" -m charlm best sweeps/gpu.yaml)
fi
start=$(date +%s)
timeout $(upto 240) "${sweep[@]}" > "$log" 2>&1 || fail=1
swept=$(( $(date +%s) - start ))
timeout $(upto 5) "${best[@]}" >> "$log" 2>&1 || fail=1
grep -E "^best|^  seed|^test loss" "$log" | tail -6 | tee -a "$LOG"
note "gpu study: sweep ${swept} s + best $(( $(date +%s) - start - swept )) s; $(grep -E '^test loss' "$log" | tail -1)"
note "$(grep -E '^  seed' "$log" | tr -s ' ' | paste -sd ';')"
note "$(figures gpu 4 "$swept")"
}

steps=(_ speed sharing tests baby_gpt study)
for s in $order; do  # all checked before any runs
  [[ "$s" =~ ^[1-5]$ ]] || { echo "GPU_CHECK_STEPS=\"${GPU_CHECK_STEPS}\": no step $s; the steps are 1-5" >&2; exit 2; }
done
for s in $order; do  # in the order given: GPU_CHECK_STEPS="3 2"
  ${steps[$s]}
done

echo
echo "== summary after $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
[ $fail = 0 ] && echo "gpu check: passed" | tee -a "$LOG" || echo "gpu check: FAILED (see above)" | tee -a "$LOG"
exit $fail
