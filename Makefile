# charlm: `make help` lists the targets. Every Python target creates .venv on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXP    ?= experiments/gpt.yaml
SWEEP  ?= sweeps/default.yaml
WORKERS ?= 1
SET    ?=
MODEL  ?= mlruns/best
PORT   ?= 5000
DPORT  ?= 8080
DOCSPORT ?= 8000
STORE  ?= mlruns
# `make server`: its own store (workers elsewhere cannot write a local artifact path), artifacts served
BACKEND   ?= sqlite:///$(abspath mlruns/server)/mlflow.db
ARTIFACTS ?= mlruns/server/artifacts
ALLOWED_HOSTS ?=  # Host headers the server answers besides localhost and private IPs, e.g. mlflow.lab:5000
HOST   ?= 127.0.0.1
TEXT   ?=
BUDGET ?= 45m
SEED   ?=
# `make serve`: a registered model (alias or version) from the store charlm writes; MODEL stays a checkpoint path
SERVE_MODEL ?= models:/charlm-default@champion
# The development/CI copy of tiny shakespeare sits in ../shared/data; a user's own setting wins.
export CHARLM_DATA_MIRROR ?= $(abspath ../shared/data)

SET_ARGS := $(foreach s,$(SET),--set $(s))
STORAGE ?=  # an Optuna storage URL for sweep/best/report/dashboard, e.g. postgresql://charlm@dbhost/optuna
STORAGE_ARG := $(if $(STORAGE),--storage $(STORAGE))
TEXT_ARG := $(if $(TEXT),--text '$(TEXT)')

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned requirements (done on first use by every target)

all: $(STAMP) ## the whole search to one deadline: sweep, then best: make all BUDGET=45m [TEXT=my.txt] [SEED=1]
	$(PY) -m charlm sweep $(SWEEP) --budget $(BUDGET) --workers $(WORKERS) $(TEXT_ARG) $(if $(SEED),--seed $(SEED)) $(STORAGE_ARG)
	$(PY) -m charlm best $(SWEEP) --budget $(BUDGET) $(TEXT_ARG) $(STORAGE_ARG)

sweep: $(STAMP) ## run or resume an Optuna study: make sweep SWEEP=sweeps/smoke.yaml WORKERS=2 [STORAGE=url]
	$(PY) -m charlm sweep $(SWEEP) --workers $(WORKERS) $(STORAGE_ARG)

best: $(STAMP) ## retrain the best trial at its clock over seeds, test, save to mlruns/best/<study>/, register it
	$(PY) -m charlm best $(SWEEP) $(STORAGE_ARG)

train: $(STAMP) ## train one model: make train EXP=experiments/gpt.yaml SET="train.lr=1e-3 train.max_steps=500"
	$(PY) -m charlm train $(EXP) $(SET_ARGS)

sample: $(STAMP) ## generate text: make sample MODEL=mlruns/best/smoke (default: the newest under mlruns/best, named)
	$(PY) -m charlm sample --model $(MODEL)

eval: $(STAMP) ## score a text file: make eval MODEL=... TEXT=file.txt
	$(PY) -m charlm eval --model $(MODEL) $(if $(TEXT),--text $(TEXT),--split test)

docs: $(STAMP) ## build the docs site to site/, strict (a broken link or any warning fails); reference pages regenerated first
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

docs-serve: $(STAMP) ## preview the docs site on http://127.0.0.1:8000 (DOCSPORT= to change), rebuilt as pages change
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve -a 127.0.0.1:$(DOCSPORT)

lint: $(STAMP) ## ruff over the code, tests and benches (rules and line length in pyproject.toml)
	$(VENV)/bin/ruff check .

test: $(STAMP) ## the test suite (fast tests, a few minutes on 2 cores)
	$(PY) -m pytest -q --durations=10

test-slow: $(STAMP) ## the long tests (full trainings, process kills, the UI in Chromium)
	$(PY) -m pytest -q -m slow

test-pg: $(STAMP) ## scale-out test: a throwaway PostgreSQL, an MLflow server, two workers, one killed
	$(PY) -m pytest -q -s -m pg

test-faults: $(STAMP) ## faults from outside, for real: unwritable and full disks, servers and PostgreSQL killed, stores cut (root)
	$(PY) -m pytest -q -m faults --durations=5

bench-search: $(STAMP) ## asha vs fixed-budget patience vs Hyperband, same space and wall clock (MINUTES=12 each, SEEDS="0 1")
	$(PY) bench/search.py --minutes $(or $(MINUTES),12) --seeds $(or $(SEEDS),0 1)

bench-seeds: $(STAMP) ## `make all` for sampler seeds 0 1 2 in fresh folders, and the base retrained alike: the search gain (BUDGET=45m)
	$(PY) bench/seeds.py --budget $(BUDGET) --seeds $(or $(SEEDS),0 1 2) $(TEXT_ARG)

gpu-check: $(STAMP) ## on a GPU machine: tests marked gpu, the fast suite, GPU speed, 1 vs 4 workers (bench/gpu_check.sh)
	PY=$(PY) bash bench/gpu_check.sh

bench: $(STAMP) ## speed vs matmul peak and a plain PyTorch baseline, eval share, memory; save cost per evaluation; sweep load; the shipped GPT against nanoGPT's CPU recipe
	$(PY) bench/speed.py
	$(PY) bench/save_cost.py
	$(PY) bench/sweep_load.py
	$(PY) bench/recipe.py

report: $(STAMP) ## Markdown report of a study with its plots: mlruns/reports/<study>/report.md (also on the parent run)
	$(PY) -m charlm report $(SWEEP) $(STORAGE_ARG)

dashboard: $(STAMP) ## optuna-dashboard on http://127.0.0.1:8080 over the study's storage (HOST=, DPORT= to change)
	$(PY) -m charlm dashboard $(SWEEP) --host $(HOST) --port $(DPORT) $(STORAGE_ARG)

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 over mlruns/ (HOST=, PORT=, STORE= to change) to compare runs
	mkdir -p $(STORE)
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(abspath $(STORE))/mlflow.db --host $(HOST) --port $(PORT)

server: $(STAMP) ## MLflow tracking server for many machines: make server BACKEND=postgresql://mlflow@db/mlflow HOST=0.0.0.0
	mkdir -p $(ARTIFACTS)
	$(VENV)/bin/mlflow server --backend-store-uri $(BACKEND) --artifacts-destination $(abspath $(ARTIFACTS)) \
		--serve-artifacts --host $(HOST) --port $(PORT) $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS))

serve: $(STAMP) ## REST scoring server on 127.0.0.1:5000 for a registered model (SERVE_MODEL=models:/charlm-smoke@champion, PORT=)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlruns)/mlflow.db} PATH=$(abspath $(VENV))/bin:$$PATH \
		$(VENV)/bin/mlflow models serve -m $(SERVE_MODEL) --env-manager local --host $(HOST) --port $(PORT)

clean: ## remove caches and build leftovers (keeps mlruns/ and .venv)
	rm -rf .pytest_cache build site *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

.PHONY: help install all bench-seeds docs docs-serve lint sweep best train sample eval test test-slow test-pg test-faults gpu-check bench bench-search report dashboard ui server serve clean
