#!/usr/bin/env bash
# Wheels of our packages for a GPU machine that reaches no package registry and whose own python
# holds a CUDA build of torch (bench/gpu_check.sh runs under it):
#   bench/gpu_wheels.sh HAVE [DIR]
# HAVE: what that machine's python already holds, as `python3 -m pip list --format=freeze` prints
#   it there (a name per line also does); those packages are left to it, torch first among them.
# DIR: where the wheels go (default .whl). Resolved here for its Python and platform
#   (GPU_PYTHON, default 3.12; manylinux x86-64), one version of each package, never torch. Then,
#   on the GPU machine, with the text beside it (CHARLM_DATA_MIRROR, docs/how-to/gpu.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
have=${1:-}
dir=${2:-.whl}
[ -n "$have" ] && [ -r "$have" ] || {
  echo "gpu_wheels: cannot read '$have': pass a file with the GPU machine's python3 -m pip list --format=freeze" >&2; exit 2; }
compgen -G "$dir/*.whl" > /dev/null && {  # an older set beside a new one: two versions of a package stop the install
  echo "gpu_wheels: $dir already holds wheels; remove them or name an empty folder" >&2; exit 2; }
py=${PY:-python3}
target=(--python-version "${GPU_PYTHON:-3.12}" --implementation cp --only-binary=:all:)
for n in 17 27 28 31 34; do target+=(--platform "manylinux_2_${n}_x86_64"); done
target+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# what the tests and the check import: requirements.txt without torch (the machine's own CUDA
# build), ruff (lint runs in CI) and playwright (the browser test is a slow test, never run there)
grep -vE '^\s*(#|$)|^(torch|ruff|playwright)\b' requirements.txt | sed 's/\s*#.*//' > "$tmp/req.txt"
"$py" -m pip install -q --dry-run --ignore-installed --target "$tmp/none" "${target[@]}" \
  --report "$tmp/report.json" -r "$tmp/req.txt"
# canonical names (PEP 503) of what is there, then the resolved set less those
"$py" - "$have" "$tmp/report.json" > "$tmp/pins.txt" <<'PYEOF'
import json, re, sys
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {canon(re.split(r"[=<>~!@ ]", line.strip(), maxsplit=1)[0]) for line in open(sys.argv[1]) if line.strip()}
have.add("torch")
for item in json.load(open(sys.argv[2]))["install"]:
    meta = item["metadata"]
    if canon(meta["name"]) not in have:
        print(f"{meta['name']}=={meta['version']}")
PYEOF
mkdir -p "$dir"
"$py" -m pip download -q --no-deps "${target[@]}" -d "$dir" -r "$tmp/pins.txt"
echo "gpu_wheels: $(wc -l < "$tmp/pins.txt") packages the machine lacks, $(du -sh "$dir" | cut -f1) in $dir:"
paste -sd ' ' "$tmp/pins.txt"
