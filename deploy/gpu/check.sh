#!/usr/bin/env bash
# GPU check of segpipe on a lent GPU machine (one H100/H200, 16 cores, its own Python 3.12 with torch and
# torchvision, no Ray, no Prefect, no network). Run from the repository root: `bash deploy/gpu/check.sh`.
#
# What it does, writing everything under ${OUT:-deploy/gpu/out}:
#   1. a venv in a temporary folder that sees the machine's packages (torch, torchvision, numpy, pyarrow, ...),
#      plus what the core and the tests need that the machine may lack (deploy/gpu/requirements.txt), installed
#      offline from the wheelhouse deploy/gpu/wheels/; the project itself runs from the tree (PYTHONPATH);
#   2. env.txt: nvidia-smi, the Python, torch, torchvision and CUDA versions, the device's name;
#   3. pytest-gpu.txt: tests/test_gpu.py (reduced precision and CUDA vs CPU masks);
#   4. bench-<model>-bs<batch>.json (and .log): `segpipe bench --paths ceiling,core` without Ray, one process per
#      configuration: deeplabv3_resnet50 and fcn_resnet50 at 520x520, bf16, batch 1, 8 and 32, one actor,
#      1024 images (SEGPIPE_GPU_CHECK_COUNT); ceiling is the forward pass alone, core the whole job
#      (decode, model, PNG masks, Parquet stats) in one process; both report the GPU's peak memory;
#   5. datapath-pointwise.json: the data path on this node (the 1x1-convolution model, 512x512): each step's cost
#      alone, the host-side steps in threads vs processes over all cores, and the whole job in one process;
#   6. summary.md: one row per configuration (also printed at the end).
# It exits 1 when a step failed (the steps after it still run).
#
# With the device tool: first, here, `make gpu-wheels` (fills the git-ignored deploy/gpu/wheels/, about 10 MiB);
# then run `bash deploy/gpu/check.sh` on the device with carry ["deploy/gpu/wheels"]; the device tool sets $OUT
# and brings its files back.
#
# Time budget: about 4-5 minutes on an H200 (venv ~15 s, tests ~30 s, the workload's JPEGs once ~30 s, each of the
# six configurations ~30 s). No configuration starts past SEGPIPE_GPU_CHECK_BUDGET seconds from the start
# (default 450) and none runs past it, so the script ends within about 8 minutes; give the device tool a
# timeout_s of 540 or more.
#
# SEGPIPE_GPU_CHECK_CPU=1 runs the same steps on CPU at a tiny scale (lraspp_mobilenet_v3_large, 16 images of
# 128x128, fp32, batch 1 and 4; the GPU tests skip) to test the script itself. PYTHON picks the interpreter
# (default python3); when it is a venv itself, the new venv sees that venv's packages instead of the system's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-deploy/gpu/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/bench-*.json "$OUT"/bench-*.log "$OUT"/summary.md  # a previous run's, which the summary would read
BUDGET=${SEGPIPE_GPU_CHECK_BUDGET:-450}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/segpipe-gpu-check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export TMPDIR=$TMP  # the bench jobs' outputs and pytest's tmp_path land there too, and go with it

if [[ ${SEGPIPE_GPU_CHECK_CPU:-0} == 1 ]]; then
    MODELS=(lraspp_mobilenet_v3_large) BATCHES=(1 4) SIZE=128 DP_SIZE=128 COUNT=16 DEVICE=cpu PRECISION=fp32
else
    MODELS=(deeplabv3_resnet50 fcn_resnet50) BATCHES=(1 8 32) SIZE=520 DP_SIZE=512 DEVICE=cuda PRECISION=bf16
    COUNT=${SEGPIPE_GPU_CHECK_COUNT:-1024}
fi
FAILED=()
step() { echo "== [${SECONDS}s] $*"; }

# 1. The venv. --system-site-packages makes the machine's torch and torchvision visible; a .pth file names the
# folders where $PY finds its packages, so that a $PY that is itself a venv (as in the CPU test) is seen as well.
step "venv from $PY ($("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
VENV=$TMP/venv
SYSTEM_SITE=--system-site-packages
if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    SYSTEM_SITE=  # a venv's base Python holds other packages than the venv: see the venv's alone
fi
if "$PY" -m venv $SYSTEM_SITE "$VENV" >"$OUT/venv.txt" 2>&1; then
    PIP=("$VENV/bin/python" -m pip)
else  # no ensurepip (Debian without python3-venv): a venv without pip, filled by $PY's own pip
    rm -rf "$VENV"
    "$PY" -m venv $SYSTEM_SITE --without-pip "$VENV"
    PIP=("$PY" -m pip --python "$VENV/bin/python")
fi
VPY=$VENV/bin/python
"$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_segpipe_parent_site.pth"
step "pip install -r deploy/gpu/requirements.txt from deploy/gpu/wheels"
# Offline, from the wheelhouse alone (PIP_CONFIG_FILE=/dev/null: no index or find-links of a pip.conf either).
PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 "${PIP[@]}" install --no-index \
    --find-links deploy/gpu/wheels -r deploy/gpu/requirements.txt >>"$OUT/venv.txt" 2>&1 ||
    { tail -30 "$OUT/venv.txt"; echo "pip install failed: did you run 'make gpu-wheels' and carry deploy/gpu/wheels?"; exit 1; }
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

# 2. The machine.
step "env.txt"
{
    echo "# nvidia-smi"
    timeout 60 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    echo
    echo "# python"
    timeout 120 "$VPY" - <<'EOF' 2>&1 || echo "(the versions failed)"
import importlib.metadata as md
import os
import platform
import sys

import torch
import torchvision

print("python", sys.version.replace("\n", " "), sys.executable)
print("platform", platform.platform(), "cpus", len(os.sched_getaffinity(0)))
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("torchvision", torchvision.__version__)
for dist in ("numpy", "pyarrow", "pillow", "fsspec", "pydantic", "PyYAML", "safetensors", "pycocotools", "pytest"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, None)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", torch.cuda.get_device_name(i), f"capability {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
if torch.cuda.is_available():
    print("bf16 supported", torch.cuda.is_bf16_supported())
EOF
} >"$OUT/env.txt"
grep -E '^(python|torch|torchvision|cuda) ' "$OUT/env.txt" || true

# 3. The GPU tests (skipped without CUDA).
step "pytest tests/test_gpu.py"
# Only pytest-timeout among plugins: the machine's own packages may bring pytest plugins made for another pytest.
if PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout -k 10 150 "$VPY" -m pytest tests/test_gpu.py -v -s -p no:cacheprovider \
    -p pytest_timeout >"$OUT/pytest-gpu.txt" 2>&1; then
    tail -1 "$OUT/pytest-gpu.txt"
else
    tail -30 "$OUT/pytest-gpu.txt"
    FAILED+=("pytest (see pytest-gpu.txt)")
fi

# 4. The bench, one process per configuration; the workload (JPEGs, checkpoints) is built once in one --work.
for model in "${MODELS[@]}"; do
    for batch in "${BATCHES[@]}"; do
        name=bench-$model-bs$batch
        left=$((BUDGET - SECONDS))
        if ((left < 45)); then
            step "$name skipped: ${left}s of the ${BUDGET}s budget left"
            FAILED+=("$name (no time left)")
            continue
        fi
        step "$name ($COUNT images of ${SIZE}x$SIZE, $DEVICE $PRECISION)"
        if ! timeout -k 10 $((left < 240 ? left : 240)) "$VPY" -m pipeline.cli bench --paths ceiling,core \
            --model "$model" --size "$SIZE" --count "$COUNT" --batch-size "$batch" --actors 1 --device "$DEVICE" \
            --precision "$PRECISION" --work "$TMP/work" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
            tail -30 "$OUT/$name.log"
            FAILED+=("$name (see $name.log)")
        fi
    done
done

# 5. The data path on this node: the pointwise (1x1 convolution) model on the GPU, the images on local disk. limit:
# each step alone, one thread; host: the CPU-side steps in 1 thread, a thread per core, a process per core (the
# GIL's toll at this node's core count); core: the whole job in one process, what one GPU actor can be fed.
name=datapath-pointwise
if (($((BUDGET - SECONDS)) >= 60)); then
    step "$name"
    if ! timeout -k 10 $((BUDGET - SECONDS)) "$VPY" -m pipeline.cli bench --paths limit,host,core --model pointwise \
        --size "$DP_SIZE" --count "$COUNT" --batch-size 32 --actors 1 --device "$DEVICE" --work "$TMP/work" \
        --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
        tail -30 "$OUT/$name.log"
        FAILED+=("$name (see $name.log)")
    fi
else
    FAILED+=("$name (no time left)")
fi

# 6. The summary.
step "summary"
"$VPY" -m pipeline.bench.gpu_summary "$OUT"
if ((${#FAILED[@]})); then
    printf 'failed: %s\n' "${FAILED[@]}" | tee -a "$OUT/summary.md"
    exit 1
fi
echo "all steps passed in ${SECONDS}s; files in $OUT"
