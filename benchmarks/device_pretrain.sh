#!/usr/bin/env bash
# Pretraining variants of the embedded backbone on an accelerator, then the
# frozen-feature probe and a one-seed mini-VTAB suite (linear probe and
# VPT-Deep, val200 selection of LR and prompt count) on each, beside the
# shipped backbone: issue 4's lever "improve the pretraining", as one run.
#
# Usage, in the repository root of the device machine, with the wheels the
# GPU image lacks (ml_collections, tensorflow_datasets and its deps) in
# $WHEELS, the prepared mini-VTAB TFDS folders in $TFDS_DATA_DIR and the
# probe's arrays (benchmarks/probe_features.py --export) in $ARRAYS:
#   bash benchmarks/device_pretrain.sh
# Results stream to $OUT: each variant's backbone.npz and model card, the
# probe table and the suites' final runs (JSON lines). For a CPU dry run:
#   VARIANTS="s:smoke,orientation_bins=8:" SUITE_ARGS=,smoke \
#     ARRAYS=minivtab32.npz bash benchmarks/device_pretrain.sh
set -uo pipefail
out=${OUT:-/tmp/vptpc_device_pretrain}
mkdir -p "$out"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
# Pins a command to CPUs $1 on a 16-core host; runs it unpinned elsewhere.
pin() {
  if [ "$(nproc)" -ge 16 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi
}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, tensorflow_datasets as t; print(jax.devices(), t.__version__)"
# name:config-args:extra flags; one pretraining process per variant.
variants=${VARIANTS:-"ori16:orientation_bins=16:"}
# Not pinned: pinned to two cores, XLA's GPU compile and the host loop were
# so slow that a run reached step 600 of 5,000 in 180 s (unpinned: all
# 5,000 in 80 s on an H100).
for v in $variants; do
  IFS=: read -r name args extra <<<"$v"
  # shellcheck disable=SC2086
  timeout "${PRETRAIN_S:-180}" python3 -m vptpc.pretrain \
    --config=configs/pretrain.py:$args $extra --workdir="/tmp/pt/$name" \
    >"/tmp/pretrain_$name.log" 2>&1 &
done
wait
backbones=vptpc/assets/fractal_vit_ti4.npz
for v in $variants; do
  name=${v%%:*}
  [ -f "/tmp/pt/$name/backbone.npz" ] || tail -5 "/tmp/pretrain_$name.log"
  cp "/tmp/pt/$name/backbone.npz" "$out/backbone_$name.npz"
  cp "/tmp/pt/$name/model_card.json" "$out/card_$name.json"
  echo "$name: $(grep -o '"upstream_held_out": {[^}]*}' "$out/card_$name.json")"
  grep -o '"train_seconds": [0-9.]*' "$out/card_$name.json"
  backbones=$backbones,/tmp/pt/$name/backbone.npz
done
timeout 60 python3 benchmarks/probe_features.py --arrays="${ARRAYS:?}" \
  --backbone="$backbones" --prompts=0,3 2>/dev/null | tee "$out/probe.md"
cores=0
for b in ${backbones//,/ }; do
  name=$(basename "$(dirname "$b")")
  pin $cores-$((cores + 3)) timeout "${SUITE_S:-270}" python3 -m vptpc.suite \
    --config="configs/suite.py:seeds=42,methods=linear:deep,workers=4,backbone=$b${SUITE_ARGS:-}" \
    --workdir="/tmp/suite/$name" >"/tmp/suite_$name.log" 2>&1 &
  cores=$((cores + 4))
done
wait
for b in ${backbones//,/ }; do
  name=$(basename "$(dirname "$b")")
  echo "== $name"; tail -12 "/tmp/suite_$name.log" | grep -v '^{'
  for f in /tmp/suite/"$name"/*/*/seed42/suite_result.json; do
    [ -f "$f" ] && { sed "s/^{/{\"backbone\": \"$name\", /" "$f"; echo; } \
      >>"$out/suite_runs.jsonl"
  done
done
