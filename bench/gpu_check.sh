#!/usr/bin/env bash
# One prepared check for a GPU machine, meant to take under 8 minutes on one H100/H200-class GPU
# (issue 15; not yet run on one):
#   1. the tests marked gpu (compiled CUDA training, a NaN caught at the next evaluation, the
#      memory guard of workers sharing a GPU);
#   2. the whole fast suite, as CI runs it on CPU (train.device=auto picks the GPU there);
#   3. speed: bench/gpu_speed.py (real trainer eager and compiled against a plain compiled
#      PyTorch reference of the same shape, FLOP/s as a share of the measured bf16 peak);
#   4. a short sweeps/gpu.yaml study with 1 worker, then with 4 sharing the GPU: trials/minute.
# Needs the project's packages importable (on the device machine: wheels carried in .whl/, see
# the README's GPUs section) and the text: CHARLM_DATA_MIRROR=<folder holding tinyshakespeare.txt>.
# Writes everything it prints to ${OUT:-/tmp}/gpu_check.log as well.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${PY:-python3}" || echo "$PWD/${PY:-python3}")  # absolute: step 4 runs from a scratch folder
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=${OUT:-/tmp}/gpu_check.log
export PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI= CI=true
fail=0
step() { echo; echo "== $*" | tee -a "$LOG"; }

step "1. tests marked gpu"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee -a "$LOG" || fail=1
step "2. the fast suite on the GPU machine"
timeout 300 $PY -m pytest -q -p no:cacheprovider -x --durations=5 2>&1 | tail -25 | tee -a "$LOG" || fail=1
step "3. speed, 6x384 context 256 batch 64 bf16"
$PY bench/gpu_speed.py --run-steps 600 2>&1 | tee -a "$LOG" || fail=1
step "4. sweeps/gpu.yaml shrunk (1-minute study, rungs 5 s / 15 s / 45 s), 1 worker then 4 sharing the GPU"
for workers in 1 4; do
  dir=$(mktemp -d)
  sed "s/timeout_min: 9/timeout_min: 1/; s/name: gpu,/name: gpu-w$workers,/; s/min_seconds: 20/min_seconds: 5/;
       s/train.max_minutes: 3.0 /train.max_minutes: 0.75/" sweeps/gpu.yaml > "$dir/gpu.yaml"
  sed -i "s#base: experiments/#base: $PWD/experiments/#; s#baseline: experiments/#baseline: $PWD/experiments/#" "$dir/gpu.yaml"
  start=$(date +%s)
  (cd "$dir" && $PY -m charlm sweep gpu.yaml --workers $workers > sweep.log 2>&1) || fail=1
  took=$(( $(date +%s) - start ))
  $PY - "$dir" "$workers" "$took" <<'PYEOF' 2>&1 | tee -a "$LOG"
import sys, optuna
from optuna.trial import TrialState
folder, workers, took = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
from charlm.storage import open_storage
name = f"gpu-w{workers}"
study = optuna.load_study(study_name=name, storage=open_storage(f"journal:{folder}/mlruns/optuna/{name}.journal"))
done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
failed = [t.user_attrs.get("error", "") for t in study.trials if t.state == TrialState.FAIL]
print(f"{workers} worker(s): {len(done)} trials finished in {took / 60:.1f} min = {len(done) / (took / 60):.1f} trials/min; "
      f"{len(failed)} failed {failed[:1]}")
PYEOF
done
echo
[ $fail = 0 ] && echo "gpu check: passed" | tee -a "$LOG" || echo "gpu check: FAILED (see above)" | tee -a "$LOG"
exit $fail
