# The two commands of the README contract, from a fresh clone:
#   make demo   set everything up, then run the main job
#   make test   set everything up, then run ruff, the CUDA compile check and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,deepspeed,hf,experiments,serve,ft
# The shared data folder beside the checkout (TinyShakespeare, gpt2.tiktoken), if present;
# otherwise the product downloads what it needs.
export SPD_EXT_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)

.PHONY: setup demo bench test lint cuda-compile pytest report clean

# torch first and pinned (an unpinned torch pulls the CUDA wheels), then the project with
# its C++ ops prebuilt against that torch.
$(VENV)/.installed: setup.py pyproject.toml $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=64" wheel
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) "numpy>=1.24,<3"
	SPD_BUILD_OPS=1 $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	# DeepSpeed's CPU communication op too (a minute, once), so no first job sits silent
	$(BIN)/python -c "import importlib.util as u; u.find_spec('deepspeed') and \
		__import__('spd_ext.deepspeed.ops', fromlist=['x']).load_deepspeed_comm_op()"
	touch $@

setup: $(VENV)/.installed

report: setup
	$(BIN)/spd-ext report

# The main job (about 5 minutes on 2 cores): `spd-ext train` on 2 CPU ranks under the
# deepspeed launcher, ZeRO-1, a small char GPT on TinyShakespeare: tensor parallelism 2 with
# the dense pattern tp*4 against the reduced spd*4, then data parallelism 2 with rank 1's
# shard corrupted, uniform against signal-weighted. One table, one plot, logs in out/demo/.
demo: report
	$(BIN)/python -m spd_ext.train.demo --out out/demo

bench: setup
	$(BIN)/spd-ext bench allreduce --nproc 2 --dtype fp32,bf16 --sizes 4K..64M

lint: setup
	$(BIN)/ruff check .

cuda-compile: setup
	PYTHON=$(BIN)/python scripts/compile_cuda.sh

# The whole suite runs twice: against the C++ kernels and against the PyTorch fallbacks.
pytest: setup
	$(BIN)/python -m pytest -q
	SPD_EXT_FORCE_FALLBACK=1 $(BIN)/python -m pytest -q

test: lint cuda-compile pytest

clean:
	rm -rf $(VENV) build *.egg-info spd_ext/ops/*.so
