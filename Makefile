# Two commands set everything up on a fresh machine:
#   make demo   - create .venv if missing, install, run the main job on the built-in example
#   make test   - create .venv if missing, install, run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p build/demo
	$(PY) -m onnx_basisprune examples/digits/model.onnx --calib examples/digits/calib --eval examples/digits/heldout -o build/demo/digits.pruned.onnx --report build/demo/report.json

test: $(STAMP)
	$(PY) -m pytest -q

# The benchmark suite (about an hour on 2 cores): builds the transfer models, then writes
# benchmarks/RESULTS.md. Needs ../shared beside the checkout.
bench: $(STAMP)
	$(PY) benchmarks/transfer_models.py
	$(PY) benchmarks/run_benchmarks.py

clean:
	rm -rf build $(VENV)
