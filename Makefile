# paragen: two commands from a fresh machine.
#   make demo   set up .venv, then generate an image on 2 ranks (embedded tiny-sd) into out/
#   make test   set up .venv, then run the test suite
# CUDA users: make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= mpi,video,deepspeed,test
NPROC       ?= 2
DEMO_ARGS   ?= --mode displaced --height 512 --width 512 --steps 20

BIN := $(VENV)/bin
STAMP := $(VENV)/.paragen-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first and pinned: installing the package first would let pip pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/torchrun --nproc-per-node $(NPROC) -m paragen image $(DEMO_ARGS) --out out

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/bench_image.py
	$(BIN)/python bench/plot_image.py
	$(BIN)/python bench/bench_dit.py
	$(BIN)/python bench/plot_dit.py
	$(BIN)/python bench/bench_hires.py
	$(BIN)/python bench/plot_hires.py
	$(BIN)/python bench/bench_video.py
	$(BIN)/python bench/plot_video.py
	$(BIN)/python bench/bench_llm.py
	$(BIN)/python bench/plot_llm.py

clean:
	rm -rf $(VENV) out
