#!/usr/bin/env bash
# The accelerator run of the benchmark, as one short script (issue 8):
# benchmarks/vpt_bench.py at batch 128 in bf16 compute on every prompt path
# with XLA's attention, then the key/value path with cuDNN's fused attention,
# and the PyTorch reference on the same GPU. Rows stream to $OUT/*.jsonl
# as they are measured, so a run cut short still reports what it measured.
#
# Usage, in the repository root of the device machine:
#   bash benchmarks/device_check.sh PATH/TO/torch_vpt_ref.py [WHEEL ...]
# WHEELs (e.g. ml_collections, which the GPU image lacks) are installed to
# /tmp/site first. BENCH_ARGS overrides the model arguments for a dry run on
# a CPU, e.g. BENCH_ARGS="--model=testing --image_size=32 --batch=4".
set -uo pipefail
ref=${1:?path to torch_vpt_ref.py}
shift
out=${OUT:-/tmp/vptpc_device_check}
mkdir -p "$out"
if [ "$#" -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$@" \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
  --format=csv 2>/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
model=${BENCH_ARGS:-"--batch=128 --matmul_n=8192 --spec_tflops=989"}
common="--dtype=bfloat16 --modes=jit --warmup=2 --iters=10 $model"
# shellcheck disable=SC2086
timeout "${XLA_S:-400}" python3 benchmarks/vpt_bench.py --out="$out/xla" \
  --prompts=0,30,100 --small --torch_ref="$ref" $common \
  2>"$out/xla.err" | tee "$out/xla.jsonl"
tail -3 "$out/xla.err"
# shellcheck disable=SC2086
timeout "${CUDNN_S:-120}" python3 benchmarks/vpt_bench.py \
  --out="$out/cudnn" --attention=cudnn --prompts=0,100 --paths=kv \
  --torch_ref= $common 2>"$out/cudnn.err" | tee "$out/cudnn.jsonl"
tail -3 "$out/cudnn.err"
# cuDNN attention must compute what XLA's does: one bf16 forward of each.
timeout "${CHECK_S:-60}" python3 - <<'PY' 2>&1 | tail -2
import jax, jax.numpy as jnp
from vptpc import prompts as pr
from vptpc.models import vit
cfg = vit.get_model_config("B/16", num_classes=100)
params = vit.init_params(vit.create_model(cfg), jax.random.key(0), 224)
p = pr.init_prompts(jax.random.key(1), num_prompts=100, hidden_size=768,
                    patch_size=16, num_layers=12)
x = jax.random.normal(jax.random.key(2), (32, 224, 224, 3))
out = {}
for impl in ("xla", "cudnn"):
  m = vit.create_model(cfg, dtype=jnp.bfloat16, kv_only=True,
                       attention_impl=impl)
  out[impl] = jax.jit(m.apply)({"params": params}, x, p).astype(jnp.float32)
err = jnp.linalg.norm(out["cudnn"] - out["xla"]) / jnp.linalg.norm(out["xla"])
print(f"cudnn vs xla logits, B/16 kv bf16, 100 prompts: rel err {err:.2e}")
PY
