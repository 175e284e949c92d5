#!/usr/bin/env bash
# One short accelerator check: forward and train-step throughput of
# ViT-B/16 + 100 deep prompts (full vs key/value-only), and the PyTorch
# reference on the same device. Tables go to stdout and to $OUT (if set).
# Usage: bash benchmarks/device_check.sh PATH/TO/torch_vpt_ref.py
set -uo pipefail
ref=${1:?path to torch_vpt_ref.py}
out=${OUT:-/tmp/vptpc_device_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
run() { name=$1; shift; echo "== $name"; "$@" 2>"$out/$name.err" | tee "$out/$name.md"; }
run fwd_b8_f32 python3 benchmarks/forward.py --iters 20 --warmup 3
run train_b8_f32 python3 benchmarks/train_step.py --modes jit --iters 20 --warmup 3
run torch_b8_f32 python3 benchmarks/run_torch_ref.py "$ref" --device cuda -- --prompts 100 --batch 8 --steps 20 --warmup 3
run fwd_b128_bf16 python3 benchmarks/forward.py --batch 128 --dtype bfloat16 --iters 10 --warmup 2
run train_b128_bf16 python3 benchmarks/train_step.py --batch 128 --dtype bfloat16 --modes jit --iters 10 --warmup 2
run torch_b128_f32 python3 benchmarks/run_torch_ref.py "$ref" --device cuda -- --prompts 100 --batch 128 --steps 10 --warmup 2
