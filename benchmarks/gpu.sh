#!/usr/bin/env bash
# One prepared GPU check (at most 8 minutes wall on an H200), two tables from benchmarks/step.py:
# 1. the paper's TRM (D=512, 8 heads, SwiGLU 1536, 24 recursion steps, seq 121) at batch 64 under bf16
#    autocast, on maze batches, for none, laser at rank 128 and 256 (library defaults otherwise: the guarded
#    policy, bf16 matmuls, factored weight gradients), laser-recon (every coded tensor reconstructed: what
#    factored gradients save), laser-paper (the forward that never waits for the device), laser with int8
#    codes, laser with the power-iteration statistic on every 8th row (laser-s8, laser-s8-int8), laser-ref
#    (fp32 matmuls: the reference path), checkpoint, laser-int8+checkpoint and laser-int8+coded-checkpoint;
# 2. the issue-14 target shape (the same block, 8 recursion steps, batch 8, fp32): none, laser, laser-recon,
#    checkpoint, laser-int8+checkpoint, laser-int8+coded-checkpoint at rank 128.
# Each prints one markdown table: saved bytes (report), activation bytes held after the forward
# (torch.cuda.memory_allocated), max memory allocated over one step (and its rise above the memory in use
# before it), and the step time as a ratio to none, from up to a few hundred interleaved steps.
#
#   bash benchmarks/gpu.sh                                      # on the GPU machine, from the repo root
#   bash benchmarks/gpu.sh --device cpu --steps 2 --batch 2     # dry run of the same script on a CPU
#
# Extra arguments go to benchmarks/step.py and override the settings below (the last occurrence wins).
set -euo pipefail
cd "$(dirname "$0")/.."

# The machine has no network: install without build isolation, and fall back to src/ on the path.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('laser') is None)"; then
    pip install -q --no-deps --no-build-isolation -e . || {
        echo "pip install failed; importing laser from src/" >&2
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# Each timed phase stops after --budget seconds; the memory probes and the first-step SVDs take well under a
# minute more, and the outer timeouts keep the whole run inside the 8 minutes even if something stalls.
timeout 290 python benchmarks/step.py \
    --device cuda --amp bf16 --batch 64 --dims 512 --depths 24 --ranks 128 256 \
    --methods none laser laser-recon laser-paper laser-int8 laser-s8 laser-s8-int8 laser-ref checkpoint \
    laser-int8+checkpoint laser-int8+coded-checkpoint --warmup 3 --steps 300 --budget 150 --memory inprocess --threads 1 \
    "$@"
timeout 170 python benchmarks/step.py \
    --device cuda --amp none --batch 8 --dims 512 --depths 8 --ranks 128 \
    --methods none laser laser-recon checkpoint laser-int8+checkpoint laser-int8+coded-checkpoint \
    --warmup 3 --steps 300 --budget 80 --memory inprocess --threads 1 \
    "$@"
