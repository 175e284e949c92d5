"""VTAB-1k / FGVC protocol: tune lr x wd, final seeds, and the report table.

VPT's protocol (docs/references.md, "VPT: optimiser and schedule" and "VPT:
protocol"), reproduced:

* ``tune`` (`tune`): every (base_lr, weight_decay) of ``config.protocol``'s
  grid (default VPT's ``tune_vtab.py`` grid, 10 x 4) trains on train800 and
  is scored on val200 at the last epoch; the winner is the best val top-1,
  ties to the smallest LR (then the first weight decay in the grid).
  Written to ``<workdir>/tune.json`` and ``tune.csv``.
* ``final`` (`final`): the seeds (default 42, 44, 82, 100, 800) train on
  train800val200 with the tuned values and report last-epoch test top-1;
  ``<workdir>/final.json`` holds mean, std and every seed.
* ``report`` (`report`, ``python -m vptpc.protocol report``): collects
  ``final.json`` files into one table beside VPT's published numbers, with
  group means and both averaging conventions (mean of the three group
  means, VPT's headline; plain mean over tasks, V-PETL's), as Markdown and
  CSV.

Every run lives in its own sub-workdir, so an interrupted grid resumes
where it stopped (finished runs are read back from their ``results.json``,
after the preflight has checked that each was trained with the config the
new invocation would use; `vptpc.preflight`). The runs themselves, each
grid point's and seed's config and workdir, are `vptpc.protocol_runs`'.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vptpc import faults, lifecycle, protocol_runs, records, stops, sweep, train
from vptpc.data import vtab
from vptpc.protocol_runs import final_runs, tune_runs, tuned_values


def _run(config, workdir: str) -> dict[str, Any]:
  """One run of a grid or of the seeds; a finished one is read back.

  The preflight of `tune` / `final` has compared each finished run's stored
  config with ``config`` already, so a result read back is this config's.
  """
  return protocol_runs.done(workdir) or train.train_and_evaluate(
    config, workdir
  )


def _accuracy(res: dict[str, Any]) -> float:
  """Final accuracy of a run (the condensed model for a PC run)."""
  if "condensed" in res:
    return res["condensed"]["eval_accuracy"]
  return res["eval_accuracy"]


def tune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the lr x wd grid on the tune splits; writes ``tune.json``.

  Every grid point's result lands in its own ``tune/lr<lr>_wd<wd>`` run
  directory (with ``protocol.vmap``, once its vmapped chunk has trained),
  so an interrupted grid resumes at the first unfinished point or chunk.
  """
  workdir = lifecycle.local_workdir(workdir, config)
  with lifecycle.entry(config, workdir, kind="protocol") as run:
    run.start(store_config=False)
    with stops.stage(
      f"in the tune grid of {workdir} (finished grid points are kept)"
    ):
      return _tune(config, workdir)


def _tune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  p = config.protocol
  runs = tune_runs(config, workdir)
  already = all(protocol_runs.done(d) for _, d in runs)
  rows, chunks = [], []
  if p.get("vmap", False):
    size = p.get("vmap_chunk", 0) or len(runs)
    for i in range(0, len(runs), size):
      part = runs[i : i + size]
      results = [protocol_runs.done(d) for _, d in part]
      if not all(results):
        # Chunks keep their members on a resume: a vmapped job's numbers
        # depend only on its members.
        c = ml_collections.ConfigDict(part[0][0].to_dict())
        results = sweep.train_grid(
          c,
          [(pc.base_lr, pc.weight_decay) for pc, _ in part],
          export_dirs=[d for _, d in part],
          member_configs=[pc for pc, _ in part],
        )
      timing = results[0].get("timing")
      if timing is not None and not any(t == timing for t in chunks):
        chunks.append(timing)
      for (pc, _), r in zip(part, results, strict=True):
        acc = r["eval_accuracy"]
        acc = float("nan") if acc is None else acc
        rows.append(
          {
            "base_lr": pc.base_lr,
            "weight_decay": pc.weight_decay,
            "val": acc,
          }
        )
  for c, run in runs if not p.get("vmap", False) else ():
    lr, wd = c.base_lr, c.weight_decay
    try:
      acc = _accuracy(_run(c, run))
    except FloatingPointError as e:
      # A diverged grid point is a result (it loses), not a crash.
      logging.warning("lr %s wd %s diverged: %s", lr, wd, e)
      acc = float("nan")
    rows.append({"base_lr": float(lr), "weight_decay": float(wd), "val": acc})
    logging.info("tune lr=%s wd=%s val=%.4f", lr, wd, acc)
  finite = [r for r in rows if math.isfinite(r["val"])]
  if not finite:
    raise FloatingPointError(f"Every grid point diverged; see {workdir}/tune.")
  best_val = max(r["val"] for r in finite)
  # Ties to the smallest LR (tune_vtab.py), then the first wd in the grid.
  best = min(
    (r for r in finite if r["val"] == best_val), key=lambda r: r["base_lr"]
  )
  out = {
    "task": config.data.get("task", "") or config.data.name,
    "splits": list(p.tune_splits),
    "vmapped": bool(p.get("vmap", False)),
    "best": best,
    "grid": rows,
  }
  if chunks:
    out["chunks"] = chunks  # wall time of each vmapped job
  os.makedirs(workdir, exist_ok=True)
  records.write_json(os.path.join(workdir, "tune.json"), out)
  with open(os.path.join(workdir, "tune.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["base_lr", "weight_decay", "val"])
    w.writeheader()
    w.writerows(rows)
  if already:
    print(
      f"tune: already finished in {workdir} ({len(rows)} grid points, "
      "unchanged config); nothing trained."
    )
  print(
    f"tune: best base_lr={best['base_lr']:g} weight_decay="
    f"{best['weight_decay']:g} val top-1 {100 * best['val']:.2f}% "
    f"({len(rows)} grid points) -> {workdir}/tune.json"
  )
  return out


def final(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the seeds on the final splits; writes ``final.json``."""
  workdir = lifecycle.local_workdir(workdir, config)
  with lifecycle.entry(config, workdir, kind="protocol") as run:
    run.start(store_config=False)
    return _final(config, workdir)


def _final(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  lr, wd, source = tuned_values(config, workdir)
  runs = final_runs(config, workdir)
  already = all(protocol_runs.done(d) for _, d in runs)
  accs, seeds = [], []
  for i, (c, run) in enumerate(runs):
    t0 = time.perf_counter()
    with stops.stage(
      f"in the final seeds of {workdir} before seed {c.seed} ({i + 1} of "
      f"{len(runs)}; the {i} before it are finished and kept)"
    ):
      if i:
        faults.point("final_seed")
      res = _run(c, run)
    accs.append(_accuracy(res))
    seeds.append(
      {
        "seed": int(c.seed),
        "test": accs[-1],
        "workdir": run,
        "wall_s": round(time.perf_counter() - t0, 2),
        "train_img_per_s": res.get("train_img_per_s"),
      }
    )
  out = {
    "task": config.data.get("task", "") or config.data.name,
    "benchmark_name": config.data.name,
    "variant": config.prompt.variant,
    "num_prompts": config.prompt.num_prompts,
    "condense_keep": config.condense.keep,
    "normalize": config.data.normalize,
    "model": config.model.name,
    "base_lr": lr,
    "weight_decay": wd,
    "tuned_from": source,
    "splits": list(config.protocol.final_splits),
    "mean": float(np.mean(accs)),
    "std": float(np.std(accs)),
    "seeds": seeds,
  }
  records.write_json(os.path.join(workdir, "final.json"), out)
  if already:
    print(
      f"final: already finished in {workdir} ({len(accs)} seeds, unchanged "
      "config); nothing trained."
    )
  print(
    f"final: {out['task']} test top-1 {100 * out['mean']:.2f} ± "
    f"{100 * out['std']:.2f} over {len(accs)} seeds (lr {lr:g}, wd {wd:g} "
    f"from {source}) -> {workdir}/final.json"
  )
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Dispatches on ``config.protocol.mode`` (single, tune, final).

  Every mode checks its preconditions first and reports all unmet ones in
  one `vptpc.preflight.PreflightError` before writing anything
  (`vptpc.rundir`).
  """
  mode = config.protocol.mode
  if mode == "tune":
    return tune(config, workdir)
  if mode == "final":
    return final(config, workdir)
  return train.train_and_evaluate(config, workdir)


# ---------------------------------------------------------------- report


def collect(patterns: Sequence[str]) -> list[dict[str, Any]]:
  """Reads ``final.json`` files (paths, directories or globs)."""
  out = []
  for pat in patterns:
    if os.path.isdir(pat):
      pat = os.path.join(pat, "**", "final.json")
    paths = sorted(glob.glob(pat, recursive=True))
    if not paths:
      raise FileNotFoundError(f"{pat!r} matches no final.json.")
    for path in paths:
      with open(path) as f:
        r = json.load(f)
      r["path"] = path
      out.append(r)
  return out


def report(finals: Sequence[dict[str, Any]]) -> tuple[str, list[dict]]:
  """Builds the results table (Markdown, CSV rows) from final runs.

  Rows are tasks in the registry's order, ours as mean ± std (n seeds)
  beside VPT's published VPT-Deep / VPT-Shallow / full fine-tuning numbers.
  Group means and the two averages are computed over the tasks present and
  say how many; the published aggregates are quoted only when all 19 VTAB
  tasks are present.
  """
  by_task = {}
  for r in finals:
    if r["task"] in by_task:
      raise ValueError(
        f"Two final runs for task {r['task']!r}: {by_task[r['task']]['path']} "
        f"and {r['path']}; pass one."
      )
    by_task[r["task"]] = r

  def row(key, r, task):
    pub = task.published if task else {}
    return {
      "benchmark": task.benchmark if task else "other",
      "group": task.group if task else "other",
      "task": key,
      "ours_mean": round(100 * r["mean"], 2),
      "ours_std": round(100 * r["std"], 2),
      "seeds": len(r["seeds"]),
      "prompts": r.get("num_prompts", ""),
      "condense_keep": r.get("condense_keep", 0.0),
      "base_lr": r["base_lr"],
      "weight_decay": r["weight_decay"],
      "normalize": r.get("normalize", ""),
      "vpt_deep_published": pub.get("vpt_deep", ""),
      "vpt_shallow_published": pub.get("vpt_shallow", ""),
      "full_ft_published": pub.get("full_ft", ""),
    }

  # Registry order first, then datasets outside the registry.
  rows = [
    row(k, by_task.pop(k), t) for k, t in vtab.TASKS.items() if k in by_task
  ]
  rows += [row(k, r, None) for k, r in by_task.items()]
  if not rows:
    raise ValueError("No final runs to report.")
  lines = [
    "Test top-1 (%), mean ± std over seeds, last epoch; published: VPT "
    "(Jia et al. 2022), ViT-B/16 IN-21k "
    '(docs/references.md, "VPT: published numbers").',
    "",
    "| group | task | ours | seeds | prompts | lr | wd | VPT-Deep "
    "(paper) | VPT-Shallow (paper) | Full FT (paper) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['group']} | {r['task']} | {r['ours_mean']:.2f} ± "
      f"{r['ours_std']:.2f} | {r['seeds']} | {r['prompts']} | "
      f"{r['base_lr']:g} | {r['weight_decay']:g} | "
      f"{r['vpt_deep_published']} | {r['vpt_shallow_published']} | "
      f"{r['full_ft_published']} |"
    )
  vt = [r for r in rows if r["benchmark"] == "vtab"]
  if vt:
    lines += ["", "| VTAB-1k aggregate | ours | tasks | VPT-Deep (paper) |"]
    lines.append("|---|---|---|---|")
    group_means = []
    for g in vtab.GROUPS:
      sub = [r for r in vt if r["group"] == g]
      total = sum(t.group == g for t in vtab.VTAB.values())
      if not sub:
        continue
      m = float(np.mean([r["ours_mean"] for r in sub]))
      group_means.append(m)
      pub = vtab.PUBLISHED_MEANS["vpt_deep"][g] if len(sub) == total else "–"
      lines.append(f"| {g} mean | {m:.2f} | {len(sub)}/{total} | {pub} |")
    full = len(vt) == len(vtab.VTAB)
    pm = vtab.PUBLISHED_MEANS["vpt_deep"]
    lines.append(
      f"| mean of group means | {np.mean(group_means):.2f} | "
      f"{len(group_means)}/3 groups | "
      f"{pm['mean_of_groups'] if full else '–'} |"
    )
    lines.append(
      f"| mean over tasks | {np.mean([r['ours_mean'] for r in vt]):.2f} | "
      f"{len(vt)}/{len(vtab.VTAB)} | {pm['mean_19'] if full else '–'} |"
    )
  return "\n".join(lines) + "\n", rows


def write_report(patterns: Sequence[str], out: str) -> str:
  """Writes ``report.md`` and ``report.csv`` into ``out``; returns the md."""
  md, rows = report(collect(patterns))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out, "report.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return md


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m vptpc.protocol report --out=DIR RUN_DIR_OR_GLOB ...``."""
  ap = argparse.ArgumentParser(prog="python -m vptpc.protocol")
  sub = ap.add_subparsers(dest="command", required=True)
  rp = sub.add_parser("report", help="Aggregate final.json files.")
  rp.add_argument("runs", nargs="+", help="final.json paths, dirs or globs")
  rp.add_argument("--out", required=True, help="Output directory.")
  a = ap.parse_args(argv)
  try:
    md = write_report(a.runs, a.out)
  except (FileNotFoundError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")
  print(md)


if __name__ == "__main__":
  main()
