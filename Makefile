# Every target installs what it needs: `make demo` and `make test` work on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTO_OUT := swapline
PROTOS := $(shell find protos -name '*.proto')
PROTO_STAMP := $(PROTO_OUT)/.generated
MODELS_STAMP := build/models/.built
FACENET_VERSION := 2.6.0

.PHONY: all install protos models demo test test-fast lint bench bench-gpu clean

all: install protos models

# Triton's Python-backend stub links against the system libpython of the same version; Debian's
# prometheus brings promtool and the server that the alert-rule and scrape tests run; postgresql the
# server the PostgreSQL job store tests start; openssl the CA and certificates of `swapline up --secure`.
SYSTEM_PACKAGES := libpython3.11 prometheus postgresql openssl

# Checked on every run (dpkg -s is cheap) so that a package added here reaches machines that already
# have the stamp; the stamp is touched only when first made, so the venv is not rebuilt for it.
$(VENV)/.system-packages: FORCE
	@if ! dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi
	@mkdir -p $(VENV) && test -e $@ || touch $@

FORCE:

# constraints.txt pins every package, the wheel's build requirements too (grpcio-tools writes the protos'
# code), as in the image's Dockerfile. The pinned pip comes first: a new venv's own may not know
# --build-constraint.
$(INSTALLED): pyproject.toml constraints.txt $(VENV)/.system-packages
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --constraint constraints.txt --upgrade pip
	$(PY) -m pip install -q --constraint constraints.txt --build-constraint constraints.txt \
		-e '.[dev]' --config-settings editable_mode=compat
	touch $@

install: $(INSTALLED)

# The wheel's build writes the same package into the wheel (protos/generate.py is its build_py).
$(PROTO_STAMP): $(INSTALLED) $(PROTOS) protos/generate.py
	$(PY) protos/generate.py .
	touch $@

protos: $(PROTO_STAMP)

# The MTCNN weights come inside the facenet-pytorch wheel; only its data files are used.
build/weights/facenet_pytorch-$(FACENET_VERSION)-py3-none-any.whl: $(INSTALLED)
	mkdir -p build/weights
	$(PY) -m pip download -q --no-deps --dest build/weights facenet-pytorch==$(FACENET_VERSION)

$(MODELS_STAMP): $(PROTO_STAMP) build/weights/facenet_pytorch-$(FACENET_VERSION)-py3-none-any.whl $(shell find services/model_build -name '*.py' 2>/dev/null)
	$(PY) -m services.model_build --weights-wheel build/weights/facenet_pytorch-$(FACENET_VERSION)-py3-none-any.whl --repository triton_models
	mkdir -p build/models && touch $@

models: $(MODELS_STAMP)

demo: $(MODELS_STAMP)
	$(PY) -m services.cli demo --workdir demo-output

test: $(MODELS_STAMP)
	$(PY) -m pytest -q

lint: $(PROTO_STAMP)
	$(VENV)/bin/ruff check services tests protos
	$(VENV)/bin/mypy

bench: $(MODELS_STAMP)
	$(PY) -m services.bench --workdir build/bench

# The GPU benchmark cannot reach the GPU machine from here: this packs what must travel there into
# ignored .gpu-*/ folders and prints the device tool's calls (services/bench/gpu_carry.py).
bench-gpu: $(MODELS_STAMP)
	$(PY) -m services.bench.gpu_carry

clean:
	rm -rf build $(PROTO_OUT) demo-output triton_models/*/1/model.onnx triton_models/*/1/*.pt

# The service image (deploy/docker/Dockerfile) with the first engine that answers: docker, then podman.
# Models are not baked in: Triton reads them from its model repository.
IMAGE ?= swapline:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_ENGINES ?= docker podman

.PHONY: images
images:
	@for candidate in $(IMAGE_ENGINES); do \
		if command -v $$candidate >/dev/null 2>&1 && $$candidate info >/dev/null 2>&1; then engine=$$candidate; break; fi; \
	done; \
	if [ -z "$$engine" ]; then \
		echo "make images: no container engine available: none of '$(IMAGE_ENGINES)' is installed with a reachable daemon/runtime; install docker or podman to build $(IMAGE)" >&2; \
		exit 1; \
	fi; \
	echo "$$engine build -f deploy/docker/Dockerfile -t $(IMAGE) ."; \
	$$engine build -f deploy/docker/Dockerfile -t $(IMAGE) .
