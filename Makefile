# Set-up on a fresh machine: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-oldest test-newest test-device-versions test-triton-versions test-slow bench clean

# The dev set-up pins torch==2.13.0 (a CPU wheel) and triton==3.6.0 (the GPU machines' version, whose
# interpreter runs the kernel tests here); users choose their own. Triton 3.6's interpreter breaks on
# numpy 2.4 (triton-lang/triton#9171), hence numpy<2.4 here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 triton==3.6.0 'numpy<2.4'
	$(PY) -m pip install --quiet -e '.[dev,triton,onnx]'
	touch $(STAMP)

# The oldest releases pyproject.toml allows, on the oldest Python it allows (3.10, where found; else
# $(PYTHON)), and no torch or triton: the floors are tested, not only declared, and so is an install
# without the GPU extras (whose absence once broke the conformance suite).
# $(call pyenv_python,3.X): pyenv's Python 3.X by its own path (pyenv's shims refuse to run a version that
# is not the global one), or nothing.
pyenv_python = $(firstword $(wildcard $(HOME)/.pyenv/versions/$(1).*/bin/python$(1)))
PYTHON_OLDEST ?= $(firstword $(call pyenv_python,3.10) $(wildcard /usr/bin/python3.10) $(PYTHON))
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
$(OLDEST_STAMP): pyproject.toml
	$(PYTHON_OLDEST) -m venv --clear $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet 'numpy==1.24.4' 'onnx==1.16.2' 'onnxruntime==1.18.1' \
		'pytest==8.0.0' 'hypothesis==6.100.0' 'safetensors==0.4.0' 'threadpoolctl==3.0.0'
	$(OLDEST)/bin/python -m pip install --quiet --no-deps -e .
	touch $(OLDEST_STAMP)

# The newest releases on PyPI of everything a user of the CPU extras installs (numpy 2.4 and on, which the
# dev set-up cannot take; numpy 2.5 and on need Python 3.12), on the newest Python found in pyenv (else
# $(PYTHON)), and no torch or triton; installed afresh on every run. Not part of `make test`.
PYTHON_NEWEST ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.1[0-9].*/bin/python3.1[0-9]))),$(PYTHON))
NEWEST := .venv-newest
test-newest:
	$(PYTHON_NEWEST) -m venv --clear $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet -e '.[cpu,onnx,dev]'  # a fresh venv: the newest of each
	$(NEWEST)/bin/python --version
	$(NEWEST)/bin/python -m pip list --format=freeze | grep -iE '^(numpy|onnx|onnxruntime|ml.dtypes|hypothesis|pytest)=='
	$(NEWEST)/bin/python -m pytest -q -p no:cacheprovider -W error::DeprecationWarning

# The GPU machine's versions, which bench/gpu_session.sh meets there (Python 3.12, torch 2.11, triton 3.6,
# onnxruntime 1.30), on this CPU: torch 2.11 is PyPI's CUDA build (~4.7 GB, a minute to install; it runs
# without a GPU), the package goes in from its wheel into a folder of its own and the tests run from a
# scratch folder holding a link to bench/, as that script installs and runs them (the conformance suite
# with 15 drawn cases a backend and its summary), here under Triton's interpreter. Not part of
# `make test`: a check before a GPU session, whose minutes are few.
PYTHON_DEVICE ?= $(firstword $(call pyenv_python,3.12) python3.12)
DEVICE_VENV := .venv-device
DEVICE_PYTEST := PYTHONPATH=$(CURDIR)/build/device-site $(CURDIR)/$(DEVICE_VENV)/bin/python -m pytest -q \
	-p no:cacheprovider -c $(CURDIR)/pyproject.toml --rootdir $(CURDIR)
test-device-versions: $(STAMP)
	test -x $(DEVICE_VENV)/bin/python || $(PYTHON_DEVICE) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install --quiet torch==2.11.0 triton==3.6.0 'numpy<2.4' onnxruntime==1.30.0 \
		onnx pytest hypothesis safetensors threadpoolctl matplotlib
	rm -rf build  # setuptools' build/lib would keep files since removed from the tree
	$(PY) -m pip wheel --quiet --no-deps -w build/device-wheel .
	$(DEVICE_VENV)/bin/python -m pip install --quiet --no-deps --no-index --target build/device-site build/device-wheel/*.whl
	mkdir -p build/device-scratch && ln -s $(CURDIR)/bench build/device-scratch/bench
	cd build/device-scratch && $(DEVICE_PYTEST) $(CURDIR)/tests --ignore=$(CURDIR)/tests/conformance \
		--ignore=$(CURDIR)/tests/kernels/test_triton_compile.py
	cd build/device-scratch && CROSSATTN_HYPOTHESIS_EXAMPLES=15 CROSSATTN_CONFORMANCE_SUMMARY=$(CURDIR)/build/device-conformance \
		$(DEVICE_PYTEST) $(CURDIR)/tests/conformance

# The whole suite with the oldest torch and triton that the `triton` extra allows (torch 2.9.1, triton 3.5.1;
# numpy<2.4 for that interpreter), with PyPI's newest torch (2.15.0) and the triton it pins (3.9.0, the newest),
# what `pip install 'crossattn_gpu[triton]'` resolves to from PyPI, and with torch 2.14.1 and its triton 3.8.0,
# what it resolves to where pip is capped at 2.14.1 (as on the project's machines), each in a venv of its own
# (the newest numpy but for the floor): the kernels under each one's interpreter and through each one's
# compiler (tests/kernels/test_triton_compile.py). The installs pin exact releases, so a machine's pip
# constraints (PIP_CONSTRAINT, its pip.conf's `constraint`) could only refuse them: they are set aside.
# Not part of `make test`: each torch comes as its CUDA build (~3-5 GB, a minute or two to install; they
# run without a GPU).
define triton_suite
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	PIP_CONSTRAINT=/dev/null $(1)/bin/python -m pip install --quiet torch==$(2) triton==$(3) '$(4)' -e '.[dev,onnx]'
	$(1)/bin/python -c 'import numpy, torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'
	$(1)/bin/python -m pytest -q -p no:cacheprovider
endef
TRITON_FLOOR := .venv-triton-floor
TORCH_NEWEST := .venv-torch-newest
TORCH_CAPPED := .venv-torch-capped
test-triton-versions:
	$(call triton_suite,$(TRITON_FLOOR),2.9.1,3.5.1,numpy<2.4)
	$(call triton_suite,$(TORCH_NEWEST),2.15.0,3.9.0,numpy)
	$(call triton_suite,$(TORCH_CAPPED),2.14.1,3.8.0,numpy)

demo: $(STAMP)
	$(VENV)/bin/crossattn-gpu demo

test: $(STAMP) test-oldest
	$(PY) -m pytest

test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider

# The conformance suite's property tests with 2000 drawn cases per backend instead of 200.
test-slow: $(STAMP)
	CROSSATTN_HYPOTHESIS_EXAMPLES=2000 $(PY) -m pytest tests/conformance

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(OLDEST) $(NEWEST) $(DEVICE_VENV) $(TRITON_FLOOR) $(TORCH_NEWEST) $(TORCH_CAPPED) build *.egg-info
