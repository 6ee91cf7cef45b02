# llmrelay: every developer and CI task goes through these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test test-python test-fast soak proto proto-check lint bench bench-instructions bench-calls bench-litellm ollama services clean

setup: $(STAMP)

# Reinstall when the dependency list changes; `make run` and `make test` depend on it, so a fresh clone just works.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/llmrelay-server $(ARGS)

# The gateway in front of a real llama.cpp server with a tiny generated model: tokens stream within a minute.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(ARGS)

proto: $(STAMP) tools
	$(BIN)/python scripts/gen_protos.py

proto-check: $(STAMP) tools
	$(BIN)/python scripts/gen_protos.py --check

# buf breaking compares the contract in the work tree with the one on main: no change may break a client.
lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf breaking --against '.git#branch=main'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Everything: the Python suite with its integration tier (real llama.cpp and Ollama), then the Go and TypeScript
# clients and the standard probes against the real gateway.
test: test-python test-go test-go-module test-node test-node-package test-probes

test-python: proto-check ollama services
	$(BIN)/pytest -q

# Debian's redis-server and postgresql, whose binaries the tests start on free loopback ports, capsh and promtool
# (installed when missing).
services:
	bash scripts/install_services.sh

# The integration tier's Ollama, built once from its Go module and cached outside the repo (minutes, the first time).
ollama:
	bash scripts/build_ollama.sh >/dev/null

test-fast: proto-check services
	$(BIN)/pytest -q -m 'not integration and not soak'

# The soak test for longer than `make test` runs it: concurrent calls under random faults (SOAK_S seconds).
SOAK_S ?= 60
# The stacks printed for a test that looks hung (pyproject's faulthandler_timeout) wait for the soak's own length.
soak: $(STAMP)
	LLMRELAY_SOAK_S=$(SOAK_S) $(BIN)/pytest -q -s -m soak -o faulthandler_timeout=$$(( $(SOAK_S) + 300 ))

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

# Instructions per call under valgrind (callgrind): deterministic where CPU time is noisy; to compare commits by.
bench-instructions: $(STAMP)
	$(BIN)/python -m bench.instructions $(ARGS)

# Where the Python of a call goes: its function calls per gRPC call, by function, and what each feature adds.
bench-calls: $(STAMP)
	$(BIN)/python -m bench.calls $(ARGS)

# llmrelay against LiteLLM's proxy on the same upstream, in one run; installs a pinned LiteLLM once, outside the repo.
bench-litellm: $(STAMP)
	$(BIN)/python -m bench.litellm_compare $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Go and TypeScript clients (client/go, client/node) and the standard gRPC probes.
.PHONY: tools test-go test-go-module test-node test-node-package test-probes

# The pinned Go tools (protoc plugins, grpc-health-probe, grpcurl) and client/node's npm deps, cached outside the repo.
tools:
	bash scripts/install_tools.sh

test-go: $(STAMP) tools
	cd client/go && go test -count=1 ./...

# The Go module as a user gets it: a module outside the repo requires it through client/go/README.md's recipe (a
# replace directive), builds, and calls a real gateway.
test-go-module: $(STAMP)
	bash scripts/check_go_module.sh

test-node: $(STAMP) tools
	cd client/node && npm test

# The npm package as a user gets it: packed, installed into an empty project outside the repo (dependencies from the
# npm registry), and called from CommonJS, ES modules and TypeScript.
test-node-package: $(STAMP) tools
	bash client/node/scripts/check_package.sh

test-probes: $(STAMP) tools
	bash client/probes_test.sh
