"""Your own images as a task: the two folder layouts people have.

* **Split files** (the community "extracted VTAB-1k" layout, NOAH / SSF):
  ``<root>/<split>.txt`` with one ``relative/path.jpg <int label>`` per line,
  for splits such as ``train800``, ``val200``, ``train800val200``, ``test``
  (or ``train``, ``val``, ``test``).
* **Class folders** (torchvision's ``ImageFolder``):
  ``<root>/<split>/<class name>/*.jpg``, e.g. ``root/train/cat/1.jpg`` and
  ``root/test/cat/9.jpg``. Class names are the sorted sub-folders of
  ``train`` (label = index); the other splits must use the same names.
  Since the class count comes from the folders, a class folder of
  ``train`` without images (a copy that went wrong, a suffix outside
  `IMAGE_SUFFIXES`) is an error, named by `empty_class_folders` in the
  preflight; one of ``val`` or ``test`` only gets a warning (that class
  is not evaluated).

Either layout needs at least two classes in its training split: a
classifier of one class has nothing to learn (the preflight names the
root and the class it found).

A split name may carry a slice, ``train[:80%]`` or ``train[800:]``: over
split files it slices the lines in order; over class folders it slices a
fixed shuffle (seed 0) of the sorted files, so ``train[:80%]`` and
``train[80%:]`` hold every class in proportion and never overlap.
`describe` reads a root and says which splits the protocol's modes use
(`configs/folder.py`).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif")
_SLICE = re.compile(
  r"^(?P<base>[^\[\]]+)(\[(?P<lo>[^:\]]*):(?P<hi>[^\]]*)\])?$"
)


class LayoutError(ValueError):
  """A folder is not in either layout, or a split is missing or malformed."""


def parse_split(split: str) -> tuple[str, str, str]:
  """``"train[:80%]"`` -> (``"train"``, ``""``, ``"80%"``).

  Raises:
    LayoutError: not ``name`` or ``name[lo:hi]``.
  """
  m = _SLICE.match(split.strip())
  if not m:
    raise LayoutError(
      f"Split {split!r} is not 'name' or 'name[lo:hi]' (e.g. train[:80%])."
    )
  return m["base"], m["lo"] or "", m["hi"] or ""


def _bound(text: str, n: int, default: int) -> int:
  if not text:
    return default
  try:
    if text.endswith("%"):
      return round(n * float(text[:-1]) / 100)
    v = int(text)
  except ValueError:
    raise LayoutError(f"Bad slice bound {text!r}.") from None
  return max(0, min(n, v if v >= 0 else n + v))


def apply_slice(items: list, lo: str, hi: str) -> list:
  """``items[lo:hi]`` with integer or percentage bounds."""
  n = len(items)
  return items[_bound(lo, n, 0) : _bound(hi, n, n)]


def layout(root: str) -> str:
  """``"split_files"`` or ``"class_folders"``.

  Raises:
    LayoutError: the root is missing or holds neither layout.
  """
  if not os.path.isdir(root):
    raise LayoutError(f"Folder dataset root {root!r} does not exist.")
  if glob.glob(os.path.join(root, "*.txt")):
    return "split_files"
  if os.path.isdir(os.path.join(root, "train")) and _class_dirs(root, "train"):
    return "class_folders"
  raise LayoutError(
    f"{root!r} holds neither <split>.txt files (path label per line) nor "
    "class folders train/<class>/*.jpg."
  )


def _class_dirs(root: str, split: str) -> list[str]:
  d = os.path.join(root, split)
  return sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))


def class_names(root: str) -> list[str]:
  """The class names of a class-folder root (sorted folders of ``train``)."""
  return _class_dirs(root, "train")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES)


def empty_class_folders(root: str, split: str) -> list[str]:
  """Class folders of a class-folder split that hold no image.

  Returns:
    ``<split>/<class>`` per folder without a file ending in one of
    `IMAGE_SUFFIXES`, sorted; [] for a split read from a ``.txt`` file or
    a missing split folder (`class_folder_items` names that).
  """
  base = parse_split(split)[0]
  d = os.path.join(root, base)
  if os.path.exists(os.path.join(root, f"{base}.txt")) or not os.path.isdir(d):
    return []
  return [
    f"{base}/{name}"
    for name in _class_dirs(root, base)
    if not any(map(_is_image, os.listdir(os.path.join(d, name))))
  ]


def class_folder_items(root: str, split: str) -> list[tuple[str, int]]:
  """``(relative path, label)`` of a class-folder split, slice applied.

  Raises:
    LayoutError: the split folder is missing, or holds a class that
      ``train`` lacks (its label would be undefined).
  """
  base, lo, hi = parse_split(split)
  d = os.path.join(root, base)
  if not os.path.isdir(d):
    have = sorted(
      e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))
    )
    raise LayoutError(
      f"Split folder {d!r} is missing (found: {have or 'no folders'})."
    )
  names = class_names(root)
  index = {n: i for i, n in enumerate(names)}
  unknown = sorted(set(_class_dirs(root, base)) - set(index))
  if unknown:
    raise LayoutError(
      f"{d!r} has class folders that train/ lacks: {unknown}; every split "
      "must use train/'s class names."
    )
  items = []
  for name in names:
    cdir = os.path.join(d, name)
    if not os.path.isdir(cdir):
      continue
    for f in sorted(os.listdir(cdir)):
      if _is_image(f):
        items.append((os.path.join(base, name, f), index[name]))
  if lo or hi:
    order = np.random.default_rng(0).permutation(len(items))
    items = apply_slice([items[i] for i in order], lo, hi)
  return items


def split_file_items(root: str, split: str) -> list[tuple[str, int]] | None:
  """``(path, label)`` lines of ``<root>/<split>.txt`` (slice applied).

  Returns None when the split file does not exist.

  Raises:
    LayoutError: a malformed line (file and line number named).
  """
  base, lo, hi = parse_split(split)
  path = os.path.join(root, f"{base}.txt")
  if not os.path.exists(path):
    return None
  items = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.rsplit(maxsplit=1)
      try:
        items.append((parts[0], int(parts[1])))
      except (IndexError, ValueError):
        raise LayoutError(
          f"{path}:{n}: expected 'relative/path <int label>', got "
          f"{line.strip()!r}."
        ) from None
  return apply_slice(items, lo, hi) if (lo or hi) else items


def describe(root: str) -> dict[str, Any]:
  """What a folder holds and which splits the protocol's modes use.

  Returns:
    ``layout``, ``name`` (the folder's name), ``num_classes``,
    ``class_names`` (class folders; None for split files), ``tune_splits``
    and ``final_splits`` (train, eval) pairs.

  Raises:
    LayoutError: the folder holds neither layout, or lacks the splits.
  """
  kind = layout(root)
  name = os.path.basename(os.path.normpath(root))
  if kind == "class_folders":
    names = class_names(root)
    has_val = os.path.isdir(os.path.join(root, "val"))
    has_test = os.path.isdir(os.path.join(root, "test"))
    if not has_test:
      raise LayoutError(
        f"{root!r} has train/ but no test/ class folders to evaluate on."
      )
    tune = ("train", "val") if has_val else ("train[:80%]", "train[80%:]")
    return {
      "layout": kind,
      "name": name,
      "num_classes": len(names),
      "class_names": names,
      "tune_splits": tune,
      "final_splits": ("train", "test"),
    }
  stems = {
    os.path.splitext(os.path.basename(f))[0]
    for f in glob.glob(os.path.join(root, "*.txt"))
  }
  if {"train800", "val200", "train800val200", "test"} <= stems:
    tune, final = ("train800", "val200"), ("train800val200", "test")
  elif {"train", "test"} <= stems:
    val = "val" if "val" in stems else None
    tune = ("train", val) if val else ("train[:80%]", "train[80%:]")
    final = ("trainval" if "trainval" in stems else "train", "test")
  else:
    raise LayoutError(
      f"{root!r} has split files {sorted(stems)}; expected train800, "
      "val200, train800val200 and test (extracted VTAB-1k) or train and "
      "test (optionally val, trainval)."
    )
  labels = set()
  for s in set(tune + final):
    for _, label in split_file_items(root, s) or []:
      labels.add(label)
  if not labels or min(labels) < 0:
    raise LayoutError(f"{root!r}: labels must be integers >= 0.")
  return {
    "layout": kind,
    "name": name,
    "num_classes": max(labels) + 1,
    "class_names": None,
    "tune_splits": tune,
    "final_splits": final,
  }
