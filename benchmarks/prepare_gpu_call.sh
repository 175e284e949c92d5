#!/usr/bin/env bash
# Readies the checkout for one `device` call of benchmarks/device_check.sh:
# the PyTorch peer copied into .peer/ (only the checkout travels, not
# ../shared) and the ml_collections wheel, which the GPU image lacks,
# downloaded into .whl/ (pure Python), both ignored through
# .git/info/exclude so they travel only where `carry` names them. Prints
# the call to make. Run it here, in the repository root, before the call.
set -euo pipefail
cd "$(dirname "$0")/.."
peer=${1:-../shared/bench/torch_peer.py}
[[ -f $peer ]] || { echo "no PyTorch peer at $peer" >&2; exit 2; }
exclude=.git/info/exclude
for d in /.peer/ /.whl/; do
  grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
done
mkdir -p .peer .whl
install -m 0644 "$peer" .peer/torch_peer.py
ls .whl/ml_collections-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
    ml_collections==1.1.0
whl=$(ls .whl/ml_collections-*.whl | head -1)
cat <<MSG
Ready. The call (status first; give_back after, unless rerunning at once):
  run  carry=[".peer", ".whl"]  timeout_s=540
  command: bash benchmarks/device_check.sh .peer/torch_peer.py $whl
MSG
