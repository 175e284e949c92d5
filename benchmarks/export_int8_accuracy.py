"""Accuracy change of an exported task under ONNX dynamic int8 quantization.

Exports a trained task twice with ``python -m vptpc.export``'s code path,
fp32 and ``--quantize=int8`` (onnxruntime's dynamic quantization: int8
weights, activations quantized per call), and classifies the run's
evaluation split (for the demo: the mini-VTAB test split, 1,000 images)
with vptpc's JAX model, the fp32 ONNX model and the int8 one::

  python -m vptpc.main --config=configs/demo.py --workdir=runs/demo
  python benchmarks/export_int8_accuracy.py \\
      --prompts=runs/demo/condensed/prompts.npz

The run's ``config.json`` beside the prompts file names the data. Prints a
Markdown table: top-1, agreement with the fp32 predictions, the largest
logit change, file size and batch-1 latency. The change is reported, not
asserted: int8 is not exact.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--latency_iters", type=int, default=20)
  ap.add_argument("--json", default="")
  a = ap.parse_args()

  import jax
  import ml_collections
  import numpy as np

  from vptpc import checkpoint, export, export_formats
  from vptpc import prompts as pr
  from vptpc.data import pipeline, preprocessing
  from vptpc.models import vit

  with open(os.path.join(os.path.dirname(a.prompts), "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  split = pipeline.split_from_config(config, "eval")
  images, labels = np.asarray(split.images), np.asarray(split.labels)

  model = vit.create_model(config.model.name)
  template = jax.eval_shape(
    lambda: vit.init_params(model, jax.random.key(0), config.data.image_size)
  )
  backbone = checkpoint.load_pretrained(config.model.checkpoint_path, template)
  prompts, head, _ = pr.load_prompts(a.prompts, backbone=backbone)
  clf = vit.create_model(
    config.model.name, num_classes=head["kernel"].shape[-1]
  )
  apply = jax.jit(clf.apply)
  params = {"params": vit.merge_head(backbone, head)}

  def batched(f):
    return np.concatenate(
      [
        np.asarray(f(images[i : i + a.batch]))
        for i in range(0, len(images), a.batch)
      ]
    )

  logits = {
    "vptpc JAX (fp32)": batched(
      lambda x: apply(
        params, preprocessing.normalize(x, config.data.normalize), prompts
      )
    )
  }
  sizes, latency = {}, {}
  with tempfile.TemporaryDirectory() as d:
    for name, q in (("ONNX fp32", "none"), ("ONNX int8 (dynamic)", "int8")):
      path = os.path.join(d, f"{q}.onnx")
      export.export_task(a.prompts, path, quantize=q)
      sizes[name] = os.path.getsize(path)
      sess = export_formats.onnx_session(path)
      logits[name] = batched(lambda x, s=sess: s.run(None, {"images": x})[0])
      one = images[:1]
      sess.run(None, {"images": one})
      ts = []
      for _ in range(a.latency_iters):
        t = time.perf_counter()
        sess.run(None, {"images": one})
        ts.append(time.perf_counter() - t)
      latency[name] = float(np.median(ts) * 1e3)
  ref = logits["ONNX fp32"].argmax(-1)
  rows = []
  for name, lg in logits.items():
    rows.append(
      {
        "model": name,
        "top1": float((lg.argmax(-1) == labels).mean()),
        "agree_fp32_onnx": float((lg.argmax(-1) == ref).mean()),
        "max_abs_logit_diff_vs_jax": float(
          np.max(np.abs(lg - logits["vptpc JAX (fp32)"]))
        ),
        "bytes": sizes.get(name),
        "b1_median_ms": latency.get(name),
      }
    )
  print(f"{config.data.name} {config.data.eval_split}: {len(labels)} images")
  print(
    "| model | top-1 | agrees with ONNX fp32 | max abs logit diff vs JAX "
    "| file MB | b1 median ms |"
  )
  print("|---|---|---|---|---|---|")
  for r in rows:
    mb = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
    ms = "" if r["b1_median_ms"] is None else f"{r['b1_median_ms']:.2f}"
    print(
      f"| {r['model']} | {r['top1']:.2%} | {r['agree_fp32_onnx']:.2%} | "
      f"{r['max_abs_logit_diff_vs_jax']:.3g} | {mb} | {ms} |"
    )
  if a.json:
    with open(a.json, "w") as f:
      json.dump(
        {"split": config.data.eval_split, "n": len(labels), "rows": rows},
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
