"""Prepares datasets once, so that training never downloads.

  python -m vptpc.prepare --tasks=dtd,eurosat --data_dir=~/tensorflow_datasets
  python -m vptpc.prepare --tasks=vtab --check      # report only
  python -m vptpc.prepare --tasks=minivtab          # vptpc's own, offline
  python -m vptpc.prepare --weights=timm/vit_base_patch16_224.augreg_in21k

``--tasks`` takes registry keys (`vptpc.data.vtab`: the 19 VTAB-1k tasks,
FGVC cub/nabirds/flowers/dogs/cars), mini-VTAB keys, or the groups
``vtab``, ``fgvc``, ``minivtab``, ``all``. Downloadable TFDS datasets are
built as array_record (read without TensorFlow) at the version VPT used;
datasets that need a manual download (Retinopathy, RESISC45) and the
folder-only ones (Cars, NABirds) are never fetched: the command says which
file to put where and exits non-zero until it is there. ``--check`` only
reports; ``--allow_drift`` builds the current version where the pinned one
can no longer be built (see `prepare_one`). The exit status is 0 when every requested task is ready.

``--weights`` takes timm backbone names with their pretrained tag
(``timm/<name>,...``) and fetches each ``model.safetensors`` into the
Hugging Face cache (`vptpc.hub`), or reports it already cached; a name that
cannot be fetched exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from vptpc import hub
from vptpc.data import minivtab, sources, vtab
from vptpc.models import registry

GROUPS = {
  "vtab": tuple(vtab.VTAB),
  "fgvc": tuple(vtab.FGVC),
  "minivtab": tuple(f"minivtab/{k}" for k in minivtab.TASKS),
}
GROUPS["all"] = GROUPS["vtab"] + GROUPS["fgvc"] + GROUPS["minivtab"]


def expand(tasks: str) -> list[str]:
  """Splits ``--tasks`` and expands groups; unknown keys are an error."""
  out: list[str] = []
  for t in (x.strip() for x in tasks.split(",") if x.strip()):
    if t in GROUPS:
      out += GROUPS[t]
    elif t in vtab.TASKS:
      out.append(t)
    elif t in minivtab.TASKS or t.removeprefix("minivtab/") in minivtab.TASKS:
      out.append(f"minivtab/{t.removeprefix('minivtab/')}")
    else:
      raise ValueError(
        f"Unknown task {t!r} in --tasks; known: {', '.join(vtab.TASKS)}, "
        f"{', '.join(minivtab.TASKS)} and the groups {', '.join(GROUPS)}."
      )
  if not out:
    raise ValueError("--tasks is empty.")
  return list(dict.fromkeys(out))


def prepare_one(
  key: str, data_dir: str, check: bool = False, allow_drift: bool = False
) -> tuple[bool, str]:
  """Prepares (or, with ``check``, inspects) one task.

  With ``allow_drift``, a pinned version that this TFDS can no longer build
  (caltech101 3.0.1, oxford_iiit_pet 3.2.0, svhn_cropped 3.0.0) is replaced
  by the version it builds, and the message names the version to pass as
  ``configs/vtab.py:...,tfds_version=<v>``.

  Returns:
    (ready, one-line status message).
  """
  if key.startswith("minivtab/"):
    t = minivtab.TASKS[key.split("/", 1)[1]]
    if check and sources.prepared_dir(t.tfds_name, data_dir) is None:
      return False, f"{key}: not generated yet (runs offline, ~1 min)."
    sources.prepare_local(t.tfds_name.split(":")[0], data_dir)
    return True, f"{key}: ready ({t.tfds_name})."
  task = vtab.get_task(key)
  if not task.tfds_name:
    root = vtab.folder_root(data_dir, key)
    need = [f"{s}.txt" for s in task.splits.values()]
    missing = [n for n in need if not os.path.exists(os.path.join(root, n))]
    if missing:
      return False, f"{key}: MANUAL. Missing {missing} in {root}. {task.manual}"
    return True, f"{key}: ready (folder {root})."
  where = sources.prepared_dir(task.tfds_name, data_dir)
  if where is not None:
    return True, f"{key}: ready ({where})."
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  if task.manual and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
    return False, f"{key}: MANUAL. {task.manual}"
  if check:
    return (
      False,
      f"{key}: not prepared ({task.tfds_name}); run without --check.",
    )

  name = task.tfds_name
  try:
    try:
      builder = tfds.builder(
        name, data_dir=data_dir, file_format="array_record"
      )
    except AssertionError as e:  # "cannot be loaded at version"
      if not allow_drift:
        raise
      name = name.split(":")[0]
      builder = tfds.builder(
        name, data_dir=data_dir, file_format="array_record"
      )
      drift = (
        f" DRIFT: built {name}:{builder.version} instead of "
        f"{task.tfds_name} ({str(e).splitlines()[0]}); train with "
        f"configs/vtab.py:task={key},tfds_version={builder.version}."
      )
    else:
      drift = ""
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except Exception as e:  # TFDS raises many types; report, go on.
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    note = f" Note: {task.notes}" if task.notes else ""
    return False, f"{key}: FAILED {task.tfds_name}: {first}.{note}"
  return True, f"{key}: ready ({name}).{drift}"


def prepare_weights(names: str) -> bool:
  """Fetches (or finds cached) each timm weights name of ``--weights``.

  Prints ``timm/<name>: <path>`` per name, or ``error: <message>`` to
  stderr. Names are checked against
  ``vptpc.models.registry.timm_weight_names()`` where that exists.

  Returns:
    Whether every name is in the cache now.
  """
  known = list(registry.timm_weight_names())
  wanted = [x.strip() for x in names.split(",") if x.strip()]
  if not wanted:
    print("error: --weights is empty.", file=sys.stderr, flush=True)
    return False
  ok = True
  for name in wanted:
    try:
      repo = hub.repo_id(name, known)
      path = hub.cached_weights(repo)
      if path is not None:
        print(f"{repo}: {path} (already cached)", flush=True)
        continue
      print(f"{repo}: {hub.fetch_weights(repo, known)}", flush=True)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      ok = False
  return ok


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status."""
  ap = argparse.ArgumentParser(prog="python -m vptpc.prepare")
  ap.add_argument("--tasks", help="Keys or groups, a,b,c.")
  ap.add_argument(
    "--weights", help="timm weights to fetch: timm/<name>.<tag>,... ."
  )
  ap.add_argument("--data_dir", default=sources.default_data_dir())
  ap.add_argument("--check", action="store_true", help="Report only.")
  ap.add_argument(
    "--allow_drift",
    action="store_true",
    help="Build the current version where the pinned one cannot be built.",
  )
  a = ap.parse_args(argv)
  if a.tasks is None and a.weights is None:
    ap.error("give --tasks, --weights or both.")
  if a.weights is not None and not prepare_weights(a.weights):
    return 2
  if a.tasks is None:
    return 0
  data_dir = os.path.expanduser(a.data_dir)
  try:
    keys = expand(a.tasks)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  ok = True
  for k in keys:
    ready, msg = prepare_one(k, data_dir, a.check, a.allow_drift)
    ok &= ready
    print(msg, flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
