# Every target creates .venv/ on first use and installs the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow lint bench bench-deps golden clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxllm generate --model smollm2-135m --chat --max-tokens 96 \
		--prompt "Explain in two sentences why the sky is blue."

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest workers (pytest-xdist): the suite is mostly single-threaded jit compiles; on a
# 2-core machine they cut the default run from 952 to 712 s. Work stealing (an idle worker
# takes queued tests from the other) with the longest tests first (tests/conftest.py): 537 s
# against 593 s for xdist's default hand-out in chunks. With tests compiling at XLA level 0
# (tests/conftest.py) and the kernel checks jitted: 519 s against 875 s on a 2-core AVX2
# machine, both with an empty compile cache as on CI.
test: lint
	$(PY) -m pytest -q -m "not slow" -n 2 --dist worksteal

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0' transformers accelerate
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q llama-cpp-python
	touch $@

bench-deps: $(VENV)/.installed-bench

bench: bench-deps
	$(PY) benchmarks/decode.py

golden: $(STAMP)
	$(PY) -m pip install -q -e '.[golden]'
	$(PY) tests/golden/make_golden.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
