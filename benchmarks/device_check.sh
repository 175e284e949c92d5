#!/usr/bin/env bash
# The GPU benchmark: vptpc against a compiled PyTorch peer on one GPU, in
# one run, rows streamed as they are measured (everything also goes to
# $OUT/log.txt). Stages, in order:
#   1. peer: the PyTorch peer (benchmarks/torch_peer.py: bf16 autocast,
#      SDPA), eager, then torch.compile, on ViT-B/16 at batch 128 with 0
#      and 100 deep prompts;
#   2. ablation: gpu_ablation.py times the library's default path and each
#      lever that is off by default (ABL_VARIANTS; the comment at
#      abl_variants below gives each one's rationale) in interleaved
#      rounds, checks each variant's bf16 logits against float32 (within
#      1e-2, or it is never picked), combines the winners (over 1% faster)
#      and profiles the fastest variant's train step and eval forward per
#      kernel;
#   3. bench: vpt_bench.py on the peer's settings (key/value path at 0, 10
#      and 100 prompts; eval and train), with the ablation's fastest
#      variant where it beat the default by more than 1% (PICK_LEVERS=1,
#      the default; the log, bench.json and the table name it);
#   4. e2e: e2e_bench.py times `python -m vptpc.main` tune (vmapped grid)
#      and final on a VTAB-shaped folder task and projects VPT's protocol
#      over the 19 VTAB-1k tasks from the measured step rates;
#   5. flags: the kv rows at 100 prompts and the 8192^2 matmul once per
#      XLA_FLAGS set in FLAG_SETS (";"-separated), each in its own
#      process; none by default. `import vptpc` adds
#      --xla_gpu_enable_triton_gemm=false unless the set names it;
#   6. gpu_table.py: the table with the ratios, to $OUT/table.md.
# Each stage's files are also packed into $OUT/runs.tgz as it ends, so a
# run cut off later keeps what earlier stages measured.
#
# Usage, in the repository root, with vptpc and PyTorch installed:
#   bash benchmarks/device_check.sh [PEER]
# PEER defaults to benchmarks/torch_peer.py; "none" skips the peer. For a
# CPU dry run (no peer, tiny model):
#   DRY=1 bash benchmarks/device_check.sh none
# STAGES (default "peer ablation bench e2e flags") picks stages; *_S
# variables bound each stage's seconds and TOTAL_S the whole run's (480).
# On an H200 each ViT-B/16 program compiles in 6-20 s and each
# torch.compile in 11-26 s: the peer takes about 130 s, the ablation at
# most ABL_S (190), the bench about 75 s and the end-to-end run about
# 60 s. Should the ablation take all of its time, the end-to-end run is
# what gets cut.
set -uo pipefail
peer=${1:-benchmarks/torch_peer.py}
out=${OUT:-/tmp/vptpc_device_check}
work=/tmp/vdc
# A fresh folder: the table reads every row there (flag sets append).
rm -rf "$work"
mkdir -p "$out" "$work" "$work/flags"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
stages=${STAGES:-"peer ablation bench e2e flags"}
t0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv 2>/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 -c "import torch; print('torch', torch.__version__)" 2>/dev/null
git log -1 --format='commit %h %s' 2>/dev/null
if [ "${DRY:-0}" = 1 ]; then
  model="--model=testing --image_size=32 --batch=4 --matmul_n=256"
  abl="--model=testing --image_size=32 --batch=4 --prompts=3 --iters=2 \
    --combine_margin=-1"
  abl_variants=${ABL_VARIANTS:-"auto:1,auto:1:pad_tokens=1,auto:1:kv_stacked=1:cudnn_multiple=2,auto:1:cudnn_multiple=1:xla_gpu_graph_min_graph_size=1:xla_gpu_cudnn_gemm_fusion_level=2"}
  e2e="--model=tiny32 --image_size=32 --px=40 --train=120 --test=60 \
    --tune_epochs=2 --final_epochs=2 --lrs=1:0.1 --wds=0 --vmap_chunk=1 \
    --seeds=42:44 --dtype=float32"
  prompts=0,3,10
  step_at=3
  flag_prompts=3
else
  model="--batch=128 --matmul_n=8192 --spec_tflops=989 --dtype=bfloat16"
  abl="--batch=128 --prompts=100 --iters=10"
  # The default path, then the levers not measured yet, one at a time,
  # the best-evidenced first, since past ABL_BUDGET_S (or the stage's
  # deadline) no new variant starts; winners are combined by the ablation
  # itself. Against the profiled H200 train step (26.05 ms of kernels in a
  # 28.1 ms step, results/bench_gpu_h200):
  # cuDNN lengths not padded (197 tokens, 297 keys at 100 prompts; no
  # lengths passed) instead of to multiples of 8 (200, 304): the pad
  # fusions took 1.13 ms, and levers.CUDNN_PAD says why 1 may run; CUDA
  # graphs down to one kernel, against the ~2 ms between kernels; every
  # block's prompt keys and values in one batched computation (427 of the
  # 800 kernel runs per step took under 10 us); XLA's GEMM fusions with
  # cuDNN among their autotuned backends, against the elementwise kernels
  # around the matmuls (28% of the kernel time, the GELU's forward and
  # backward 3.2 ms of it; on Hopper cuDNN needs level 2 or more, and the
  # fusions exist only with Triton GEMMs, which vptpc turns off on import:
  # the variant turns them back on for its own programs); lengths padded
  # to even (198, 298), the fallback should cuDNN refuse odd ones; the
  # block-level rewriter; cuBLASLt, whose evidence is the bench's 8192^2
  # matmul, not the step's profile, where XLA's GEMMs already ran at
  # about 740 TFLOP/s (8.0 TFLOP in 10.87 ms). A variant that fails is an
  # error row and the rest go on.
  abl_variants=${ABL_VARIANTS:-"auto:1,auto:1:cudnn_multiple=1,auto:1:xla_gpu_graph_min_graph_size=1,auto:1:kv_stacked=1,auto:1:xla_gpu_enable_triton_gemm=true:xla_gpu_cudnn_gemm_fusion_level=2,auto:1:cudnn_multiple=2,auto:1:xla_gpu_experimental_enable_fusion_block_level_rewriter=true,auto:1:xla_gpu_enable_cublaslt=true"}
  e2e="--tune_epochs=3 --final_epochs=5 --vmap_chunk=8"
  prompts=${BENCH_PROMPTS:-0,10,100}
  step_at=10
  flag_prompts=100
fi
stamp() { echo "== $(date +%T) +$((SECONDS - t0))s $*"; }
# The whole run ends by TOTAL_S (default 480 s, with room for the table):
# each stage's timeout is the smaller of its own *_S and what is left of
# TOTAL_S less TABLE_S, and a stage with under MIN_STAGE_S left is skipped
# (and says so), so a slow stage costs the later ones time, never the
# table or the files.
total_s=${TOTAL_S:-480}
left() {  # seconds a stage whose own bound is $1 may run now
  local rest=$((total_s - ${TABLE_S:-20} - (SECONDS - t0)))
  if ((rest < $1)); then echo "$rest"; else echo "$1"; fi
}
go() {  # go NAME BOUND: prints the stage's timeout, or fails (skipped)
  local s
  s=$(left "$2")
  if ((s < ${MIN_STAGE_S:-20})); then
    stamp "$1 skipped: ${s}s left of TOTAL_S=$total_s" >&2
    return 1
  fi
  echo "$s"
}
# The stage files so far, packed: a run cut off later still leaves what
# earlier stages wrote.
pack() { tar czf "$out/runs.tgz" -C "$work" . 2>/dev/null; }

if [[ $stages == *peer* && $peer != none ]] && s=$(go "peer eager" "${PEER_S:-60}"); then
  stamp "peer eager (${s}s)"
  timeout "$s" python3 "$peer" --batch 128 --prompts 0,100 \
    --paths kv --steps 10 --warmup 3 | tee "$work/peer_eager.jsonl"
  if s=$(go "peer compile" "${PEERC_S:-170}"); then
    stamp "peer compile (${s}s)"
    timeout "$s" python3 "$peer" --batch 128 \
      --prompts "${PEERC_PROMPTS:-0,100}" --paths "${PEERC_PATHS:-full,kv}" \
      --steps 10 --warmup 3 --compile | tee "$work/peer_compile.jsonl"
  fi
  pack
fi

if [[ $stages == *ablation* ]] && s=$(go ablation "${ABL_S:-190}"); then
  stamp "ablation (${s}s)"
  # --deadline_s: no phase starts that would not end 10 s before the
  # timeout, and ablation.json is rewritten after every phase, so a slow
  # compile (Triton's autotuning, say) costs the later phases, never the
  # rows the picker below reads.
  # shellcheck disable=SC2086
  (cd benchmarks && timeout "$s" python3 gpu_ablation.py \
    --out="$work/ablation" --variants="$abl_variants" \
    --eval_variants="${ABL_EVAL_VARIANTS-}" \
    --profile="${ABL_PROFILE:--1}" --profile_eval="${ABL_EVAL_PROFILE-0,$flag_prompts}" \
    --rounds="${ABL_ROUNDS:-3}" --budget_s="${ABL_BUDGET_S:-130}" \
    --deadline_s=$((s - 10)) $abl)
  pack
fi

# The levers for the stages below: the ablation's fastest variant, where
# one beat the default by more than 1% (gpu_ablation.pick_levers;
# PICK_LEVERS=0: the library's defaults), so one run measures the table
# on the faster setting whichever way the ablation goes: its named model
# fields (vpt_bench --model_fields; e2e as --config.model.* where
# the config has the key) and its XLA options (as XLA_FLAGS).
fields=""
cfg_fields=""
picked_xla=""
if [[ ${PICK_LEVERS:-1} = 1 && -f $work/ablation/ablation.json ]]; then
  { read -r fields; read -r cfg_fields; read -r picked_xla; } < <(
    cd benchmarks && python3 -c \
      'import sys, gpu_ablation; print(*gpu_ablation.pick_lines(sys.argv[1]), sep="\n")' \
      "$work/ablation/ablation.json"
  )
  [[ ${fields:--} = - ]] && fields=""
  [[ ${cfg_fields:--} = - ]] && cfg_fields=""
  [[ ${picked_xla:--} = - ]] && picked_xla=""
  stamp "levers for the stages below: fields=${fields:-none} XLA flags: ${picked_xla:-none}"
  if [[ -n $picked_xla ]]; then
    export XLA_FLAGS="$picked_xla ${XLA_FLAGS:-}"
  fi
fi
levers="--model_fields=$fields"

if [[ $stages == *bench* ]] && s=$(go vpt_bench "${BENCH_S:-200}"); then
  stamp "vpt_bench (${s}s; the library's default path; fields: ${fields:-none})"
  # shellcheck disable=SC2086
  timeout "$s" python3 benchmarks/vpt_bench.py \
    --out="$work/bench" --prompts=$prompts --paths=kv --kv_cache=0 \
    --modes=jit --warmup=2 --iters=10 --torch_ref= $model $levers \
    2>"$work/bench.err" | tee "$work/bench.jsonl"
  tail -3 "$work/bench.err"
  pack
fi

if [[ $stages == *e2e* ]] && s=$(go e2e "${E2E_S:-170}"); then
  stamp "e2e (${s}s)"
  rates=$(python3 - "$work/bench/bench.json" <<'PY'
import json, sys
try:
  rows = json.load(open(sys.argv[1]))["rows"]
  r = {x["prompts"]: x["img_s"] for x in rows if x.get("what") == "train"
       and x.get("mode") == "jit" and x.get("path") in ("kv", "none")}
  print(",".join(f"{k}:{v}" for k, v in sorted(r.items())))
except Exception:
  print("")
PY
)
  step=$(echo "$rates" | tr ',' '\n' | grep "^$step_at:" | cut -d: -f2)
  # shellcheck disable=SC2086
  timeout "$s" python3 benchmarks/e2e_bench.py \
    --out="$work/e2e" --root=/tmp/e2e_work --step_img_s="${step:-0}" \
    --deadline_s=$((s - 5)) \
    --step_rates="$rates" $e2e \
    --extra="$cfg_fields"
  pack
fi

if [[ $stages == *flags* ]]; then
  # A set that names the Triton flag replaces vptpc's choice of it.
  # None by default: XLA's flags are timed per program in the ablation
  # now (one process, interleaved rounds); FLAG_SETS is for a flag that
  # must be set before the process starts.
  default_sets=""
  IFS=';' read -ra flag_sets <<<"${FLAG_SETS-$default_sets}"
  for i in "${!flag_sets[@]}"; do
    f=${flag_sets[$i]}
    if (( SECONDS - t0 >= ${FLAGS_BEFORE_S:-430} )); then
      stamp "flags[$i] and later skipped: past FLAGS_BEFORE_S"
      break
    fi
    s=$(go "flags[$i]" "${FLAGS_S:-60}") || break
    stamp "flags[$i] (${s}s): ${f:-default}"
    # shellcheck disable=SC2086
    XLA_FLAGS="${picked_xla:+$picked_xla }$f" timeout "$s" python3 benchmarks/vpt_bench.py \
      --out="$work/flags/$i" --prompts=$flag_prompts --paths=kv \
      --kv_cache=0 --modes=jit --warmup=2 --iters=10 --torch_ref= $model \
      $levers >"$work/flags/$i.jsonl" 2>"$work/flags/$i.err"
    rc=$?
    tail -2 "$work/flags/$i.err"
    python3 -c 'import json, sys; print(json.dumps({"set": int(sys.argv[1]),
"flags": sys.argv[2], "rc": int(sys.argv[3])}))' "$i" "$f" "$rc" \
      | tee -a "$work/flags/sets.jsonl"
  done
fi

stamp "table"
python3 benchmarks/gpu_table.py "$work" | tee "$out/table.md"
pack
stamp "done"
