# paragen: two commands from a fresh machine.
#   make demo          set up .venv (the tested lock), then draw a picture on 2 ranks (embedded, trained tiny-shapes) into out/
#   make test          set up .venv, then run the test suite
#   make test-fast     the suite without the long multi-process end-to-end runs (-m "not slow")
#   make test-latest   a separate .venv-latest with the newest transformers and diffusers, then the suite
#   make lock          rewrite requirements-lock.txt from .venv (after a green `make test`)
# CUDA users: make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= mpi,video,deepspeed,serve,test
LOCK        ?= requirements-lock.txt
# The packages whose newest releases `make test-latest` checks (their APIs move monthly), with what they pull along.
LATEST      ?= transformers diffusers accelerate huggingface-hub tokenizers safetensors
VENV_LATEST ?= .venv-latest
LATEST_RE   := $(shell echo $(LATEST) | sed 's/ /|/g; s/-/[-_]/g')
NPROC       ?= 2
DEMO_ARGS   ?= --model tiny-shapes --prompt "a large red circle at the top left" --steps 20 \
               --guidance-scale 4 --mode displaced

BIN := $(VENV)/bin
STAMP := $(VENV)/.paragen-installed
PIP := --disable-pip-version-check -q
PYTEST := -m pytest -q -p no:cacheprovider

.PHONY: setup demo test test-fast test-latest lock bench bench-peers clean

setup: $(STAMP)

# torch first and pinned: installing the package first would let pip pull a multi-GB CUDA build.
# Everything else comes from the lock (constraints), so a fresh machine gets exactly what CI tested.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP) $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install $(PIP) -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/torchrun --nproc-per-node $(NPROC) -m paragen image $(DEMO_ARGS) --out out

test: $(STAMP)
	$(BIN)/python $(PYTEST)

test-fast: $(STAMP)
	$(BIN)/python $(PYTEST) -m "not slow"

# The lock without the packages under check, then their newest releases (and only what they need upgraded).
test-latest:
	test -x $(VENV_LATEST)/bin/python || $(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install $(PIP) $(TORCH_INDEX) "$(TORCH_SPEC)"
	grep -viE "^($(LATEST_RE))==" $(LOCK) > $(VENV_LATEST)/constraints.txt
	$(VENV_LATEST)/bin/python -m pip install $(PIP) -c $(VENV_LATEST)/constraints.txt -e ".[$(EXTRAS)]"
	$(VENV_LATEST)/bin/python -m pip install $(PIP) --upgrade $(LATEST)
	$(VENV_LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^($(LATEST_RE)) "
	$(VENV_LATEST)/bin/python $(PYTEST)

lock: $(STAMP)
	sed -n '1,2p' $(LOCK) > $(LOCK).new
	$(BIN)/python -m pip freeze --exclude-editable | grep -v "^torch==" \
		| awk -F'==' '{n = tolower($$1); gsub(/[._]/, "-", n); print n "==" $$2}' >> $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The peers the benchmarks run beside paragen, installed without their dependency pins (DistriFusion pins
# diffusers 0.24); each benchmark adapts its peer at run time and says so when one cannot run.
bench-peers: $(STAMP)
	$(BIN)/python -m pip install $(PIP) --no-deps "distrifuser==0.0.1b1"

bench: $(STAMP) bench-peers
	$(BIN)/python bench/bench_image.py
	$(BIN)/python bench/plot_image.py
	$(BIN)/python bench/bench_dit.py
	$(BIN)/python bench/plot_dit.py
	$(BIN)/python bench/bench_dit_families.py
	$(BIN)/python bench/plot_dit_families.py
	$(BIN)/python bench/bench_hires.py
	$(BIN)/python bench/plot_hires.py
	$(BIN)/python bench/bench_video.py
	$(BIN)/python bench/plot_video.py
	$(BIN)/python bench/bench_llm.py
	$(BIN)/python bench/plot_llm.py
	$(BIN)/python bench/bench_llm.py --model tiny-passkey-lm --out bench/results/llm_lm_cpu.json
	$(BIN)/python bench/plot_llm.py bench/results/llm_lm_cpu.json
	$(BIN)/python bench/bench_requests.py
	$(BIN)/python bench/plot_requests.py
	$(BIN)/python bench/bench_llm_stream.py
	$(BIN)/python bench/plot_llm_stream.py
	$(BIN)/python bench/bench_shapes.py
	$(BIN)/python bench/plot_shapes.py

clean:
	rm -rf $(VENV) $(VENV_LATEST) out

# GPU check (bench/gpu_check.py; see its docstring). `make gpu-wheels` here, where the package index is reachable,
# puts the wheels a bare CUDA machine lacks (diffusers & co., pytest) into $(GPU_WHEELS) (git-ignored: carry it);
# `make gpu-check` on the GPU machine runs on that machine's own python3 (its torch and transformers; no .venv there),
# installs from those wheels only what it lacks, and writes bench/results/gpu_<kind>.json (GPU_CHECK_ARGS="--out ...").
# `make gpu-check-cpu`: the same sections on the CPU with tiny sizes (bench/results/gpu_check_cpu.json).
GPU_PYTHON     ?= python3
GPU_WHEELS     ?= .gpu-wheels
GPU_CHECK_ARGS ?=

.PHONY: gpu-wheels gpu-check gpu-check-cpu

gpu-wheels:
	bash tools/gpu_wheels.sh $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py --install-wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

gpu-check-cpu: $(STAMP)
	$(BIN)/python bench/gpu_check.py --cpu $(GPU_CHECK_ARGS)
