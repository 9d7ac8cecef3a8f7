# Entry points: `make pipeline` (the whole adaptation on the embedded default), `make demo` (generate text with
# the bundled tiny model), `make test` (the whole suite, what CI runs) and `make test-quick` (every package,
# the tests marked slow left out). Each creates .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo pipeline test test-quick bench clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) -e .
	touch $@

# torch first, pinned: 2.13.0 is a CPU build on local disk here; anything else downloads a CUDA build.
$(VENV)/.test: $(VENV)/.base
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/mixtral-jax generate --prompt "中国的首都是" --prompt "[INST] 请介绍一下北京。 [/INST]" --max-new-tokens 32

# The whole adaptation on the embedded default (the test extra brings torch for the transformers check).
pipeline: $(VENV)/.test
	$(VENV)/bin/mixtral-jax pipeline

# Two processes (the trainer's tests apart), so that no one process compiles the whole suite's XLA programs.
test: $(VENV)/.test
	$(VENV)/bin/pytest -q --ignore=tests/train
	$(VENV)/bin/pytest -q tests/train

# Tests marked slow (subprocess runs, whole training runs, Pallas interpret mode) are left out.
test-quick: $(VENV)/.test
	$(VENV)/bin/pytest -q -m "not slow"

bench: $(VENV)/.test
	$(PY) -m bench.bench_model --config both

clean:
	rm -rf $(VENV) .pytest_cache
