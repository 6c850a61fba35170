# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned as a pair (timm needs torchvision); override for another platform.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,dicom,volumes,flower,export,track

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: install
	$(VENV)/bin/fedct demo --out demo-out --force

test: install
	$(VENV)/bin/ruff check fedct tests benchmarks
	$(PY) -m pytest -q --durations=15

lint: install
	$(VENV)/bin/ruff check fedct tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
