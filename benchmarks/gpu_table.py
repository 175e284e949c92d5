"""The accelerator table: vptpc beside the PyTorch peer, from one run's files.

Reads what ``benchmarks/device_check.sh`` wrote into one folder (the peer's
JSON lines, ``vpt_bench.py``'s ``bench.json``, ``gpu_ablation.py``'s
``ablation.json`` and ``e2e_bench.py``'s ``e2e.json``) and prints one
Markdown table of images/s with the ratios the project's goals are stated
in::

  python benchmarks/gpu_table.py /tmp/vdc > table.md
"""

from __future__ import annotations

import json
import os
import re
import sys

from gpu_ablation import MAX_LOGITS_ERR, gaps_sentence, within_error_bound


def _kinds_lines(what: str, kinds: list[dict], gaps, per: str) -> list[str]:
  """A profile's per-kind table (and its idle-gap sentence) as lines."""
  ms = sum(k["ms_per_step"] for k in kinds)
  lines = [
    f"\nWhere {what} ({ms:.2f} ms of kernels per {per}, `jax.profiler`):\n",
    f"| kind | ms / {per} | % |",
    "|---|---|---|",
  ]
  lines += [
    f"| {k['kind']} | {k['ms_per_step']:.2f} | {k['pct']} |" for k in kinds
  ]
  if gaps:
    lines.append("\n" + gaps_sentence(gaps, per))
  return lines


def _jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("{"):
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  return out


def _json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _bench(folder: str) -> tuple[dict, bool]:
  """vpt_bench's results in ``folder``; (bench, from its log).

  ``bench/bench.json`` is written when vpt_bench ends; a run cut off by its
  stage's timeout leaves only the rows it streamed (``bench.jsonl``, with
  the peak matmul line), which are used then.
  """
  full = _json(os.path.join(folder, "bench", "bench.json"))
  if full:
    return full, False
  path = os.path.join(folder, "bench.jsonl")
  out = {"rows": _jsonl(path)}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        m = re.match(r"peak matmul \(.*\): ([\d.]+) GFLOP/s", line)
        if m:
          out["peak_matmul_gflop_s"] = float(m.group(1))
  return out, bool(out["rows"])


def main(folder: str, spec_tflops: float = 989.0) -> str:
  """The Markdown table for the run in ``folder``."""
  peer = {}
  for name in ("peer_eager.jsonl", "peer_compile.jsonl"):
    for r in _jsonl(os.path.join(folder, name)):
      key = (r["impl"], r["prompts"], r["path"], r["what"])
      peer[key] = r["img_s"]
  bench, from_log = _bench(folder)
  ours = {}
  device = ""
  for r in bench["rows"]:
    if r.get("model") == "B/16" and r.get("mode") == "jit":
      ours[(r["prompts"], r["path"], r["what"])] = r
      device = r.get("device", device)
  lines = []

  def cell(v):
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "–"

  def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"

  lines.append(
    f"Device: {device}. ViT-B/16, 224 px, batch 128, bf16 compute, random "
    "weights; images/s (median of timed steps). vptpc: "
    "`benchmarks/vpt_bench.py`; PyTorch: `benchmarks/torch_peer.py` (bf16 autocast, "
    "SDPA), eager and `torch.compile`, run in the same invocation.\n"
  )
  has_full = any(k[1] == "full" for k in ours)
  head = ["images/s", "vptpc kv"] + (["vptpc full"] if has_full else [])
  head += [
    "torch eager kv",
    "torch.compile kv",
    "torch.compile full",
    "vptpc kv / compile kv",
    "vptpc kv / compile full",
  ]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  for label, n_p, what in (
    ("eval, 100 prompts", 100, "eval"),
    ("train step, 100 prompts", 100, "train"),
    ("eval, 0 prompts", 0, "eval"),
  ):
    kv = ours.get((n_p, "kv" if n_p else "none", what), {}).get("img_s")
    full = ours.get((n_p, "full", what), {}).get("img_s") if n_p else None
    e_kv = peer.get(("torch-peer", n_p, "kv" if n_p else "full", what))
    c_kv = peer.get(("torch-peer+compile", n_p, "kv" if n_p else "full", what))
    c_full = peer.get(("torch-peer+compile", n_p, "full", what))
    cells = [label, cell(kv)] + ([cell(full)] if has_full else [])
    cells += [
      cell(e_kv),
      cell(c_kv),
      cell(c_full),
      ratio(kv, c_kv),
      ratio(kv, c_full),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  if from_log:
    lines.append(
      "\nvptpc's rows are the ones vpt_bench streamed to `bench.jsonl`: "
      "its stage was cut off before it wrote `bench/bench.json`; the "
      'levers and XLA_FLAGS they ran with are in `log.txt` ("levers for '
      'the stages below").'
    )
  args, lev = bench.get("args", {}), bench.get("levers")
  if lev:
    text = ", ".join(f"{k}={v!r}" for k, v in lev.items())
    lines.append(f"\nvptpc's levers in these rows: {text}.")
  if args.get("model_fields"):
    lines.append(f"\nModel fields set in these rows: {args['model_fields']}.")
  if bench.get("xla_flags"):
    lines.append(f"\nXLA_FLAGS of these rows: `{bench['xla_flags']}`.")
  e0 = ours.get((0, "none", "eval"))
  if e0:
    pct = 100 * 2 * e0["gflops_actual"] * e0["img_s"] / (spec_tflops * 1e3)
    lines.append(
      f"\nEval without prompts: {e0['achieved_gflop_s'] / 1e3:.0f} TFLOP/s, "
      f"{pct:.1f}% of the {spec_tflops:g} TFLOP/s bf16 datasheet peak "
      f"({e0['pct_peak']}% of the {bench.get('peak_matmul_gflop_s', 0) / 1e3:.0f}"
      " TFLOP/s the run's 8192² matmul reached)."
    )
  abl = _json(os.path.join(folder, "ablation", "ablation.json"))
  if abl:
    lines.append("\nLevers, one at a time (train step, 100 prompts, kv):\n")
    if abl.get("complete") is False:  # files older than the flag lack it
      lines.append(
        "The ablation was cut off before its end (its stage's timeout): "
        "these are the rows it had measured.\n"
      )
    lines.append(
      "| variant | train img/s (median of rounds) | rounds | "
      "logits rel. err vs fp32 |"
    )
    lines.append("|---|---|---|---|")
    for r in abl["rows"]:
      if r.get("what") == "train":
        rounds = " / ".join(cell(x) for x in r.get("img_s_rounds", []))
        over = (
          ""
          if within_error_bound(r)
          else f" (over {MAX_LOGITS_ERR:g}: never picked)"
        )
        lines.append(
          f"| {r['name']} | {cell(r['img_s'])} | {rounds} | "
          f"{r['logits_rel_err']}{over} |"
        )
      elif r.get("what") == "error":
        lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | |")
    if abl.get("kinds"):
      v = abl.get("profiled_variant", 0)
      which = "the first variant's" if v == 0 else f"variant {v}'s"
      lines += _kinds_lines(
        f"{which} train step goes",
        abl["kinds"],
        abl.get("gaps"),
        "step",
      )
    for n_p, ep in (abl.get("eval_profiles") or {}).items():
      if ep.get("kinds"):
        lines += _kinds_lines(
          f"its eval forward goes, {n_p} prompts",
          ep["kinds"],
          ep.get("gaps"),
          "batch",
        )
  e2e = _json(os.path.join(folder, "e2e", "e2e.json"))
  if e2e:
    fi, tu = e2e.get("final", {}), e2e.get("tune", {})
    lines.append(
      f"\nEnd to end (`python -m vptpc.main`, {e2e['task']}-shaped folder "
      f"task, {e2e['prompts']} prompts): final runs sustain "
      f"{cell(fi.get('sustained_img_per_s'))} img/s"
      + (
        f" ({100 * fi['fraction_of_step_rate']:.0f}% of the isolated step's "
        f"{cell(e2e['step_img_s'])})"
        if fi.get("fraction_of_step_rate")
        else ""
      )
      + f"; the vmapped grid {cell(tu.get('sustained_member_img_per_s'))} "
      "member-img/s."
      + (
        " The final run was cut off (its stage's time ran out): the tune "
        "run's part only."
        if e2e.get("complete") is False
        else ""
      )
    )
    p = e2e.get("projection")
    if p:
      lines.append(
        f"Projected VPT protocol: {p['task_min']} min per task "
        f"(tune {p['tune_min']} + final {p['final_min']}), "
        f"{p['vtab19_h']} h for the 19 VTAB-1k tasks."
      )
  lines += _flags_table(folder, cell, ours, bench)
  return "\n".join(lines) + "\n"


def _flags_table(folder: str, cell, ours: dict, bench: dict) -> list[str]:
  """Rows of the ``flags`` stage: the default (stage 3's), then each set."""
  sets = _jsonl(os.path.join(folder, "flags", "sets.jsonl"))
  if not sets:
    return []
  out = [
    "\nXLA flag sets (vpt_bench kv rows at 100 prompts and its square bf16 "
    "matmul, one process per set):\n",
    "| XLA_FLAGS | train img/s | eval img/s | matmul TFLOP/s |",
    "|---|---|---|---|",
  ]
  train = ours.get((100, "kv", "train"), {}).get("img_s")
  evl = ours.get((100, "kv", "eval"), {}).get("img_s")
  if train or evl:
    mm = bench.get("peak_matmul_gflop_s", 0) / 1e3
    out.append(
      f"| (default: the table above) | {cell(train)} | {cell(evl)} | {mm:.3g} |"
    )
  for s in sets:
    bench = _json(os.path.join(folder, "flags", str(s["set"]), "bench.json"))
    name = f"`{s['flags']}`" if s["flags"] else "(default)"
    if s["rc"] != 0 or not bench:
      out.append(f"| {name} | failed (exit {s['rc']}) | | |")
      continue
    r = {
      x["what"]: x["img_s"]
      for x in bench["rows"]
      if x.get("mode") == "jit" and x.get("path") == "kv"
    }
    mm = bench.get("peak_matmul_gflop_s", 0) / 1e3
    out.append(
      f"| {name} | {cell(r.get('train'))} | {cell(r.get('eval'))} | {mm:.3g} |"
    )
  return out


if __name__ == "__main__":
  print(main(sys.argv[1]))
