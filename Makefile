# One command each for people and CI. Everything runs from a local virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test test-pure lint run demo bench debug image-amd64 image-arm64 arm64-wheel clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/*.pyx)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,bench,lint]'
	touch $@

install: $(VENV)/.installed

# The tests run twice where it matters: once with the compiled twins, once with MESHPROXY_NO_EXTENSIONS=1
# (tests marked `twins` are parametrised over both inside one run; see tests/conftest.py).
test: install
	$(PY) -m pytest -q -ra tests

lint: install
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/mypy proxy

run: install
	$(VENV)/bin/meshproxy run

demo: install
	$(VENV)/bin/meshproxy demo --duration $${DURATION:-15}

bench: install
	$(PY) bench/run.py

# Cython annotation (HTML showing Python interaction per line) for the native twins.
debug: install
	$(VENV)/bin/cython -a -3 native/*.pyx

image-amd64:
	bash scripts/image.sh amd64

image-arm64:
	bash scripts/image.sh arm64

# The arm64 wheel built natively under qemu, checked (AArch64 extensions, compiled twin) and smoke-tested.
arm64-wheel:
	bash scripts/arm64-wheel.sh

clean:
	rm -rf $(VENV) build *.egg-info native/*.c native/*.html proxy/_native/*.so
