# The two commands of the README. Each installs what it needs first, so both work on a fresh
# machine. torch==2.13.0 is pinned first because on the CPU-only machines the CPU wheel of that
# version is the one already on disk (an open range would pull a multi-GB CUDA build).
PY ?= python
PIP ?= $(PY) -m pip

.PHONY: demo test bench install-test install-demo

install-demo:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[demo]'

install-test:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

demo: install-demo
	$(PY) python/pretrain.py

test: install-test
	$(PY) -m pytest -q tests

bench: install-test
	$(PIP) install -q -e '.[bench]'
	$(PY) -m pytest -q benchmarks --benchmark-json=bench-out/cpu.json
