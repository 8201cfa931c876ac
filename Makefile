# Two commands for newcomers (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONSAFEPATH := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo plan-demo test venv goldens clean

# The demo: serve the committed passkey model (models/demo-passkey) on this machine's CPU.
# tests/test_demo_serving.py starts the server with exactly these arguments and sends the README's requests.
DEMO_PORT ?= 8000
DEMO_GRPC_PORT ?= 50051
DEMO_ARGS := --model models/demo-passkey --served-model-name demo-passkey --host 127.0.0.1 --dtype float32 --max-model-len 16384 --max-output-tokens 256 --prefill-chunk-tokens 2048 --kv-capacity-tokens 65536

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

venv: $(STAMP)

# The main job on its embedded default: serve the demo model (Ctrl-C stops it).
demo: $(STAMP)
	$(BIN)/longserve serve $(DEMO_ARGS) --port $(DEMO_PORT) --grpc-port $(DEMO_GRPC_PORT)

# VRAM plans for the two built-in 1M-token models (offline, no GPU).
plan-demo: $(STAMP)
	$(BIN)/longserve plan --model Qwen/Qwen2.5-7B-Instruct-1M --gpu H200-141GB
	$(BIN)/longserve plan --model Qwen/Qwen2.5-14B-Instruct-1M --gpu H100-80GB

# The whole test suite (what CI runs through .ci/run).
test: $(STAMP)
	TRITON_INTERPRET=1 bash tools/check.sh

# Regenerate golden files (review the diff like code).
goldens: $(STAMP)
	TRITON_INTERPRET=1 LONGSERVE_REGEN_GOLDENS=1 $(BIN)/pytest -q -m "not gpu and not cluster" tests
	cp manifests/crd/longcontextmodels.longserve.io.yaml charts/longserve/crds/
	$(BIN)/python tools/gen_dashboards.py

clean:
	rm -rf $(VENV) .tools build dist *.egg-info
