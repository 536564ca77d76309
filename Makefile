# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel on this machine's disk; override for another build, e.g.
#   make demo TORCH_SPEC='torch==2.13.0' PIP_EXTRA='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
SPEC ?= specs/multidigits.yaml
EXAMPLE_SPEC := specs/multidigits-layers.yaml
EXAMPLE_DIR := exported/multidigits-layers

.PHONY: demo test test-slow lint example check-example bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[hf,dev,solvers,onnx]"
	touch $@

# profile -> select -> branch -> train -> evaluate -> emit on the default spec (about a minute).
demo: $(VENV)/.installed
	$(VENV)/bin/reconfx run $(SPEC)

test: $(VENV)/.installed lint check-example
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check reconfx tests bench exported

# Regenerate the committed example and fail if it differs from what is committed.
check-example: $(VENV)/.installed
	rm -rf .example-check && mkdir -p .example-check
	$(VENV)/bin/reconfx compile $(EXAMPLE_SPEC) --out .example-check --quiet
	@for f in model.py original.py branch.diff; do \
	  diff -u $(EXAMPLE_DIR)/$$f .example-check/$$f || { echo "exported example is stale: run 'make example'"; exit 1; }; \
	done
	rm -rf .example-check

example: $(VENV)/.installed
	$(VENV)/bin/reconfx compile $(EXAMPLE_SPEC) --force  # the folder holds the committed files only

bench: $(VENV)/.installed
	$(PY) bench/compile_time.py

clean:
	rm -rf $(VENV) .example-check .pytest_cache
