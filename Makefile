# Two commands for newcomers (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONSAFEPATH := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo plan-demo test lint venv goldens clean image

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

# The whole test suite (what CI runs through .ci/run), with the image check (tools/image_check.sh: needs root;
# LONGSERVE_SKIP_IMAGE=1 skips it).
# Style and static checks (ruff, configured in pyproject.toml); tools/check.sh runs it too.
lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	TRITON_INTERPRET=1 bash tools/check.sh

# The engine image (docs/image.md#image-build): fill build/wheelhouse-$(VARIANT) here (the only step that needs a
# package index), then build the Dockerfile from it with docker if a daemon answers, else buildah.
VARIANT ?= gpu
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/longserve/longserve:$(VERSION)$(if $(filter cpu,$(VARIANT)),-cpu)
BASE_IMAGE ?= $(if $(filter cpu,$(VARIANT)),python:3.11-slim-bookworm,python:3.11-bookworm)
IMAGE_ARGS = -f Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VARIANT=$(VARIANT) \
	--build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) -t $(IMAGE) .
image: $(STAMP)
	PYTHON=$(BIN)/python bash tools/wheelhouse.sh $(VARIANT)
	@if docker info > /dev/null 2>&1; then set -x; docker build $(IMAGE_ARGS); \
	elif command -v buildah > /dev/null; then set -x; buildah bud --isolation $${BUILDAH_ISOLATION:-chroot} --layers $(IMAGE_ARGS); \
	else echo "make image: neither a docker daemon nor buildah here" >&2; exit 1; fi

# Regenerate golden files (review the diff like code).
goldens: $(STAMP)
	TRITON_INTERPRET=1 LONGSERVE_REGEN_GOLDENS=1 $(BIN)/pytest -q -m "not gpu and not cluster" tests
	cp manifests/crd/longcontextmodels.longserve.io.yaml charts/longserve/crds/
	$(BIN)/python tools/gen_dashboards.py

clean:
	rm -rf $(VENV) .tools build dist *.egg-info
