# Set-up on a fresh machine: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow bench clean

# The dev set-up pins torch==2.13.0 (a CPU wheel) and triton==3.6.0 (the GPU machines' version, whose
# interpreter runs the kernel tests here); users choose their own. Triton 3.6's interpreter breaks on
# numpy 2.4 (triton-lang/triton#9171), hence numpy<2.4 here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 triton==3.6.0 'numpy<2.4'
	$(PY) -m pip install --quiet -e '.[dev,triton,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crossattn-gpu demo

test: $(STAMP)
	$(PY) -m pytest

# The conformance suite's property tests with 2000 drawn cases per backend instead of 200.
test-slow: $(STAMP)
	CROSSATTN_HYPOTHESIS_EXAMPLES=2000 $(PY) -m pytest tests/conformance

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
