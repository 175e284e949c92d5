"""Runs a PyTorch VPT reference script on a chosen device, timed honestly.

``vpt_bench.py --torch_ref=PATH`` calls it in a subprocess. The reference
script (a plain PyTorch VPT-Deep that prints one JSON line of images/s)
builds its tensors on the default device and times with
``time.perf_counter`` alone. This wrapper sets the default device and, on
CUDA, synchronises before every timer read so asynchronous kernels are
counted. Everything after ``--`` goes to the reference. Prints the
reference's JSON lines unchanged, plus a ``device`` field::

  python benchmarks/run_torch_ref.py benchmarks/torch_vpt_ref.py \
      --device=cuda -- --prompts 100 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import sys
import time


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("reference")
  ap.add_argument("--device", default="cpu")
  argv = sys.argv[1:]
  cut = argv.index("--") if "--" in argv else len(argv)
  a = ap.parse_args(argv[:cut])
  rest = argv[cut + 1 :]
  import torch

  torch.set_default_device(a.device)
  if a.device.startswith("cuda"):
    clock = time.perf_counter

    def synced():
      torch.cuda.synchronize()
      return clock()

    time.perf_counter = synced
  sys.argv = [a.reference, *rest]
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    runpy.run_path(a.reference, run_name="__main__")
  for line in buf.getvalue().splitlines():
    rec = json.loads(line)
    rec["device"] = a.device
    if a.device.startswith("cuda"):
      rec["device"] += ":" + torch.cuda.get_device_name()
    print(json.dumps(rec))


if __name__ == "__main__":
  main()
