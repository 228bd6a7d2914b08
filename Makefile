# Two entry points: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segpipe-installed
DEMO_DATA := data/demo
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1

.PHONY: install demo s3-demo test test-fast lint clean browser gpu-wheels

$(STAMP): pyproject.toml deploy/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c deploy/constraints.txt -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DATA) outputs/demo
	$(BIN)/segpipe make-dataset $(DEMO_DATA) --count 96 --seed 2024
	$(BIN)/segpipe run --config configs/demo.yaml

# The same job with input, labels, checkpoint and output on a local S3 server (SeaweedFS) started and stopped here.
s3-demo: $(STAMP)
	rm -rf $(DEMO_DATA) outputs/s3-demo
	$(BIN)/segpipe make-dataset $(DEMO_DATA) --count 96 --seed 2024
	$(BIN)/segpipe s3-demo --data $(DEMO_DATA) --folder outputs/s3-demo --config configs/demo.yaml

# The report test opens report.html in a real headless Chromium, from the distribution's packages.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) browser
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests
	$(BIN)/ruff format --check pipeline flows tests

# The wheelhouse that deploy/gpu/check.sh installs from on a lent GPU machine (no network there; carried as
# deploy/gpu/wheels): deploy/gpu/requirements.txt with its dependencies, pinned by deploy/constraints.txt, for that
# machine's Python 3.12 and for this machine's Python (to run the check here). numpy is left out: pycocotools
# takes any, and the machine's own numpy (torch's) is the one to keep.
GPU_WHEELS := deploy/gpu/wheels
GPU_DOWNLOAD := $(PYTHON) -m pip download --quiet --only-binary=:all: -d $(GPU_WHEELS) -r deploy/gpu/requirements.txt -c deploy/constraints.txt
gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(GPU_DOWNLOAD) --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
	$(GPU_DOWNLOAD)
	rm -f $(GPU_WHEELS)/numpy-*.whl
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) data outputs .pytest_cache
