# crdgol — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080

.PHONY: help setup proto run test test-unit test-dataplane test-workflows lint bench bench-quick bench-peers bench-cache bench-workflows image clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# xds-protos ships its own, older copy of opentelemetry/proto/*; whichever wheel pip unpacks
	# last wins. The tracing code needs opentelemetry-proto's (InstrumentationScope): put it back.
	$(BIN)/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
	  "$$(grep -o 'opentelemetry-proto==[0-9.]*' pyproject.toml)"
	touch $(STAMP)

setup: $(STAMP) proto ## create .venv, install pinned dependencies, build the protos

proto: $(STAMP) ## compile proto/ into crdgol/pb with grpcio-tools
	$(BIN)/python -m crdgol.protogen

run: setup ## serve examples/quickstart on http://127.0.0.1:$(PORT)
	$(BIN)/crdgol up --manifests examples/quickstart --port $(PORT)

test: setup lint ## lint, then run every test tier (installs redis-server and prometheus as root with apt)
	@.ci/need redis-server:redis-server prometheus:prometheus promtool:prometheus
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: setup ## pure functions only
	$(BIN)/python -m pytest -q tests/unit

test-dataplane: setup ## real Envoy + extproc + mock upstream on loopback
	$(BIN)/python -m pytest -q tests/dataplane

test-workflows: setup ## the workflow engine: pure core, runs through real Envoy, extproc and the mock, and on kmock
	$(BIN)/python -m pytest -q tests/unit/test_workflow_engine.py tests/unit/test_workflow_spec.py tests/unit/test_workflow_cluster.py tests/unit/test_workflow_retention.py tests/workflow tests/kube/test_workflows.py tests/kube/test_workflow_api.py

lint: setup ## ruff and mypy --strict
	$(BIN)/ruff check crdgol extproc controller mockllm tests benchmarks
	$(BIN)/mypy crdgol extproc controller mockllm

bench: setup ## full benchmark matrix (bare Envoy, pass-through, full policy; installs wrk as root with apt)
	@.ci/need wrk:wrk
	$(BIN)/python -m benchmarks.run

bench-quick: setup ## the short benchmark (under 2 minutes) -> benchmarks/results/quick.json
	@.ci/need wrk:wrk
	$(BIN)/python -m benchmarks.run --quick

bench-peers: setup ## LiteLLM proxy (own venv, pinned) vs crdgol on the same upstream (installs wrk as root with apt)
	@.ci/need wrk:wrk
	$(BIN)/python -m benchmarks.peers

bench-cache: setup ## response cache: hit vs bare Envoy, added latency, semantic lookup -> benchmarks/results/cache.*
	$(BIN)/python -m benchmarks.cache

bench-workflows: setup ## 1,000 concurrent support-triage runs through the gateway -> benchmarks/results/workflows.json
	$(BIN)/python -m benchmarks.workflows --runs 1000

IMAGE ?= ghcr.io/crdgol/crdgol:0.1.0
image: ## build the crdgol image that deploy/ names (podman, no daemon needed, or docker)
	@runtime=$$(command -v podman || command -v docker) || { echo "no container runtime: install podman (apt-get install podman) or docker"; exit 1; }; \
	$$runtime build -t $(IMAGE) .

clean: ## remove the venv and generated code
	rm -rf $(VENV) crdgol/pb/crdgol build *.egg-info
