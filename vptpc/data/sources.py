"""Where examples come from: prepared TFDS datasets and image folders.

Three sources (``config.data.source``):

* ``tfds`` prepared as array_record: `tfds.data_source`, no TensorFlow;
* ``tfds`` prepared as tfrecord: `tfds.load` with images left encoded (needs
  the ``tf`` extra; GPUs are hidden from TensorFlow so it cannot take the
  accelerator's memory);
* ``folder``: the community "extracted VTAB-1k" layout, ``images/`` plus
  ``train800.txt`` ... with ``path label`` lines (`FolderSource`).

The readers never download: a dataset that is not prepared in ``data_dir``
fails in seconds, before TFDS is asked anything, with a message naming the
dataset, the version and the command (or manual step) that prepares it;
vptpc's own generated datasets (`LOCAL_BUILDERS`) are prepared on first use.
The preflight checks a split with `split_problems`, `folder_problems` and
`image_problems` before a run reads it.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vptpc.data import folder_layout, vtab

# vptpc's own datasets, generated locally (no network) on first use, as
# "module:class" so that TFDS is imported only when data is read (the train
# step and benchmarks run on images that lack TFDS).
LOCAL_BUILDERS = {
  "vptpc_toy": "vptpc.data.toy:VptpcToy",
  "vptpc_digits": "vptpc.data.minivtab:VptpcDigits",
  "vptpc_dsprites_loc": "vptpc.data.minivtab:VptpcDspritesLoc",
  "vptpc_dsprites_ori": "vptpc.data.minivtab:VptpcDspritesOri",
  "vptpc_count": "vptpc.data.minivtab:VptpcCount",
}
SOURCES = ("tfds", "folder")


class DataError(ValueError):
  """A dataset or split is missing or malformed."""


def default_data_dir() -> str:
  """Returns ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )


def prepare_local(name: str, data_dir: str):
  """Generates one of vptpc's own datasets into ``data_dir`` if needed.

  Nothing is downloaded: the builders draw their images locally. TFDS's own
  "Downloading and preparing dataset ..." lines would say otherwise, so they
  are replaced by one line of vptpc's own, printed only when the dataset is
  actually generated.

  Returns:
    The prepared `tfds.core.DatasetBuilder`.
  """
  # heavy (seconds to import): TFDS is imported only when data is read
  import tensorflow_datasets as tfds

  module, cls = LOCAL_BUILDERS[name].split(":")
  builder_cls = getattr(importlib.import_module(module), cls)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()
  if prepared_dir(f"{name}:{builder.version}", data_dir) is None:
    print(
      f"Generating {name} locally into {builder.data_dir} (no download; "
      "once per data_dir).",
      flush=True,
    )
  # TFDS prints its download wording with print(); nothing else runs here.
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare()
  return builder


def describe_data_dir(data_dir: str) -> str:
  """Where ``data_dir`` came from, for the startup log."""
  if os.environ.get("TFDS_DATA_DIR") == data_dir:
    return f"{data_dir} ($TFDS_DATA_DIR)"
  if data_dir == default_data_dir():
    return f"{data_dir} (default; set config.data.data_dir or $TFDS_DATA_DIR)"
  return f"{data_dir} (config.data.data_dir)"


def _split_version(name: str) -> tuple[str, str | None]:
  """``"a/b:1.2.3"`` -> (``"a/b"``, ``"1.2.3"``); no version -> None."""
  if ":" in name:
    base, version = name.split(":", 1)
    return base, version
  return name, None


def prepared_dir(name: str, data_dir: str) -> str | None:
  """Returns the prepared TFDS directory of ``name`` in ``data_dir``.

  Looks only at the file system (``<data_dir>/<name>[/<config>]/<version>/
  dataset_info.json``), so it answers in milliseconds and never touches the
  network. Without a version, the newest prepared one is returned.
  """
  base, version = _split_version(name)
  root = os.path.join(data_dir, base)
  if version is not None:
    d = os.path.join(root, version)
    return d if os.path.exists(os.path.join(d, "dataset_info.json")) else None
  found = sorted(
    glob.glob(os.path.join(root, "*", "dataset_info.json")),
    key=lambda f: [
      int(x) if x.isdigit() else 0 for x in f.split(os.sep)[-2].split(".")
    ],
  )
  return os.path.dirname(found[-1]) if found else None


def _prepare_hint(name: str, data_dir: str) -> str:
  """The exact step that makes ``name`` available in ``data_dir``."""
  base, _ = _split_version(name)
  for task in vtab.TASKS.values():
    if task.tfds_name and _split_version(task.tfds_name)[0] == base:
      if task.manual:
        return f"Manual step for {task.key}: {task.manual}"
      return (
        "Prepare it once (this downloads): python -m vptpc.prepare "
        f"--tasks={task.key} --data_dir={data_dir}"
      )
  return (
    'Prepare it once (this downloads): python -c "import '
    f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir="
    f"'{data_dir}', file_format='array_record').download_and_prepare()\""
  )


def missing_message(name: str, data_dir: str) -> str:
  """The error for a dataset that is not prepared in ``data_dir``."""
  base = name.split(":")[0]
  return (
    f"Dataset {name!r} is not prepared in data_dir {data_dir!r} (no "
    f"{os.path.join(data_dir, base, _split_version(name)[1] or '*')}/"
    "dataset_info.json). vptpc never downloads during a run. "
    + _prepare_hint(name, data_dir)
  )


def split_names(split: str) -> list[str]:
  """The split names a TFDS split string reads (``train[:800]+test``)."""
  out = []
  for part in split.split("+"):
    part = part.strip()
    out.append(part.split("[", 1)[0].strip())
  return out


def split_problems(name: str, split: str, data_dir: str) -> list[str]:
  """Split names of ``split`` that the prepared dataset does not have."""
  where = prepared_dir(name, data_dir)
  if where is None:
    return []
  try:
    with open(os.path.join(where, "dataset_info.json")) as f:
      have = [sp["name"] for sp in json.load(f).get("splits", [])]
  except (OSError, ValueError, KeyError, TypeError):
    return []
  if not have:
    return []
  bad = [n for n in split_names(split) if n not in have]
  if not bad:
    return []
  return [
    f"Split {split!r} of {name!r} names {', '.join(map(repr, bad))}, which "
    f"{where} does not have (splits: {', '.join(have)}); fix "
    "config.data.train_split / eval_split (or the config's tune_splits / "
    "final_splits)."
  ]


def folder_problems(
  root: str, split: str, num_classes: int | None
) -> tuple[list[str], list[str]]:
  """Checks a folder split without decoding an image: (problems, warnings).

  Problems: a missing root or split file, a malformed line, a label outside
  ``[0, num_classes)``, a listed image that does not exist. Warning: a
  ``num_classes`` larger than the labels use (the head's extra classes never
  see an example). Corrupt images are `image_problems`' job.
  """
  try:
    items = folder_items(root, split)
  except DataError as e:
    return [str(e)], []
  problems, warnings = [], []
  if not items:
    return [f"Split file {os.path.join(root, split)}.txt lists no images."], []
  labels = np.asarray([lab for _, lab in items])
  if num_classes is not None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
      rel, lab = items[bad[0]]
      problems.append(
        f"{os.path.join(root, split)}.txt has {len(bad)} label(s) outside "
        f"[0, {num_classes}) (first: line {bad[0] + 1}, {rel} {lab}); set "
        f"config.data.num_classes={int(labels.max()) + 1} or fix the labels."
      )
    elif labels.max() + 1 < num_classes:
      warnings.append(
        f"config.data.num_classes={num_classes} but "
        f"{os.path.join(root, split)}.txt uses labels up to "
        f"{int(labels.max())}: classes {int(labels.max()) + 1}.."
        f"{num_classes - 1} never get an example."
      )
  missing = [
    rel for rel, _ in items if not os.path.isfile(os.path.join(root, rel))
  ]
  if missing:
    problems.append(
      f"{len(missing)} image(s) listed in {os.path.join(root, split)}.txt do "
      f"not exist under {root} (first: {', '.join(missing[:3])})."
    )
  return problems, warnings


def class_problems(
  root: str, train_split: str, eval_splits: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
  """A folder dataset's classes: (problems, warnings).

  Problems: a class folder of the training split without images (the
  class count comes from the folders, so such a class is a mistake: a copy
  that went wrong, another suffix), named with the count; fewer than two
  classes in the training split (a one-class classifier has nothing to
  learn), naming the root and the class found. Warnings: a class folder
  of an evaluation split without images (that class is not evaluated).
  A missing or empty split is `folder_problems`' to name.
  """
  warnings = []
  base = folder_layout.parse_split(train_split)[0]
  others = {folder_layout.parse_split(s)[0] for s in eval_splits} - {base}
  for split in sorted(others):
    empty = folder_layout.empty_class_folders(root, split)
    if empty:
      warnings.append(
        f"{_empty(empty, os.path.join(root, split))} ({_some(empty)}): "
        "the evaluation has no example of those classes."
      )
  empty = folder_layout.empty_class_folders(root, train_split)
  if empty:
    return [
      f"{_empty(empty, os.path.join(root, base))} ({_some(empty)}): the "
      "class count comes from these folders, so each needs training images "
      "(files ending "
      f"{', '.join(folder_layout.IMAGE_SUFFIXES[:3])} ...): add them or "
      "remove the folder."
    ], warnings
  try:
    items = folder_items(root, train_split)
  except DataError:
    return [], warnings
  labels = sorted({lab for _, lab in items})
  if len(labels) == 1:
    if os.path.exists(os.path.join(root, f"{base}.txt")):
      found = f"{base}.txt labels every image {labels[0]}"
    else:
      name = folder_layout.class_names(root)[labels[0]]
      found = f"its only class is {base}/{name}"
    return [
      f"folder dataset {root} has 1 class in split {train_split!r} "
      f"({found}): a classifier needs at least 2; add the other classes' "
      "images."
    ], warnings
  return [], warnings


def _some(names: Sequence[str], n: int = 3) -> str:
  """The first ``n`` base names, and how many more."""
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(os.path.basename(x) for x in names[:n]) + more


def _empty(folders: Sequence[str], where: str) -> str:
  if len(folders) == 1:
    return f"1 class folder in {where} holds no image"
  return f"{len(folders)} class folders in {where} hold no image"


VERIFY_IMAGES = ("header", "decode", "off")


def verify_image(path: str, mode: str = "header") -> str | None:
  """Why an image file would not decode, or None if it looks fine.

  Args:
    path: the file.
    mode: ``header``: `PIL.Image.Image.verify` (the format's headers; for
      PNG every chunk's checksum; JPEG scan data is not read); ``decode``:
      a full decode, as training does.
  """
  try:
    with Image.open(path) as im:
      if mode == "decode":
        im.convert("RGB")
      else:
        im.verify()
  except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def image_problems(root: str, split: str, mode: str = "header") -> list[str]:
  """Corrupt images of a folder split, as one line (empty: none found).

  Listed files that do not exist are left to `folder_problems`; see
  `verify_image` for ``mode`` (``off`` checks nothing).
  """
  if mode == "off":
    return []
  try:
    items = folder_items(root, split)
  except DataError:
    return []  # folder_problems names it
  bad = []
  for rel in dict.fromkeys(rel for rel, _ in items):
    full = os.path.join(root, rel)
    if os.path.isfile(full):
      why = verify_image(full, mode)
      if why:
        bad.append(f"{rel} ({why})")
  if not bad:
    return []
  return [
    f"{len(bad)} corrupt image(s) in split {split!r} of {root} (first: "
    f"{'; '.join(bad[:3])}): replace or remove them (and their lines), or "
    "set config.data.verify_images=off to skip this check (a corrupt image "
    "then stops the run when a batch decodes it)."
  ]


class _TfrecordSource(Sequence):
  """A tfrecord-prepared split read once through `tfds.load` (needs TF).

  Images stay encoded (``SkipDecoding``) until the task's example function
  (`vptpc.data.decoding`) decodes them, so holding the examples costs the
  file size.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    try:
      import tensorflow as tf  # optional: the [tf] extra
    except ImportError as e:
      raise DataError(
        f"Dataset {name!r} in {data_dir!r} is prepared as tfrecord, which "
        "only TensorFlow reads. Install it (pip install -e '.[tf]') or "
        "re-prepare as array_record (python -m vptpc.prepare)."
      ) from e
    import tensorflow_datasets as tfds  # heavy: only when data is read

    tf.config.set_visible_devices([], "GPU")  # keep the GPU for JAX
    ds = tfds.load(
      name,
      split=split,
      data_dir=data_dir,
      download=False,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    self._examples = list(tfds.as_numpy(ds))

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i):
    return self._examples[i]

  def __getitems__(self, idx):
    return [self._examples[i] for i in idx]


def open_source(name: str, split: str, data_dir: str | None = None):
  """Opens a TFDS split as a random-access data source, never downloading.

  Args:
    name: TFDS name, optionally ``name:version`` or ``name/config:version``.
    split: a TFDS split string, e.g. ``train[:800]``.
    data_dir: where prepared datasets live (default `default_data_dir`).

  Returns:
    A sequence of example dicts (``image`` decoded to uint8, or encoded bytes
    from a tfrecord copy; ``label`` and the dataset's other features).

  Raises:
    DataError: the dataset is not prepared there, or the split is invalid.
  """
  import tensorflow_datasets as tfds  # heavy: only when data is read

  data_dir = data_dir or default_data_dir()
  base = name.split(":")[0]
  if base in LOCAL_BUILDERS:
    prepare_local(base, data_dir)
  else:
    where = prepared_dir(name, data_dir)
    if where is None:
      raise DataError(missing_message(name, data_dir))
    with open(os.path.join(where, "dataset_info.json")) as f:
      fmt = json.load(f).get("fileFormat", "tfrecord")
    if fmt != "array_record":
      try:
        return _TfrecordSource(name, split, data_dir)
      except DataError:
        raise
      except Exception as e:
        raise DataError(
          f"Dataset {name!r} split {split!r} could not be read from "
          f"{where!r} ({type(e).__name__}: {str(e).splitlines()[0]})."
        ) from e
  try:
    return tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except Exception as e:  # TFDS raises several types; all mean "not usable".
    raise DataError(
      f"Dataset {name!r} split {split!r} is not available in data_dir "
      f"{data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
      "vptpc never downloads during a run: prepare it first (see README, "
      "'Data'), or point config.data.data_dir at the prepared copy."
    ) from e


def resolved_info(name: str, data_dir: str | None = None) -> dict[str, Any]:
  """Name, resolved version, file format and split sizes of a dataset.

  Read from the prepared ``dataset_info.json`` (written to the workdir so a
  result names the exact data it came from; VTAB-1k subsets depend on the
  version: docs/references.md, "VTAB-1k: splits").
  """
  data_dir = data_dir or default_data_dir()
  where = prepared_dir(name, data_dir)
  if where is None:
    return {"name": name}
  with open(os.path.join(where, "dataset_info.json")) as f:
    info = json.load(f)
  return {
    "name": name,
    "version": info.get("version"),
    "file_format": info.get("fileFormat", "tfrecord"),
    "splits": {
      sp["name"]: sum(int(n) for n in sp.get("shardLengths", []))
      for sp in info.get("splits", [])
    },
    "path": where,
  }


def folder_items(root: str, split: str) -> list[tuple[str, int]]:
  """``(relative path, label)`` of a folder split, either layout.

  ``<root>/<split>.txt`` lines, else ``<root>/<split>/<class>/*`` class
  folders (`folder_layout`); a split may carry a slice (``train[:80%]``).

  Raises:
    DataError: the root or the split is missing, or a line is malformed.
  """
  if not os.path.isdir(root):
    raise DataError(
      f"Folder dataset root {root!r} does not exist (expected images/ and "
      f"{split}.txt there; see vptpc.data.vtab for the layout). Set "
      "config.data.folder, or config.data.data_dir to where "
      "vptpc_folders/<task> lives."
    )
  try:
    items = folder_layout.split_file_items(root, split)
    if items is None and os.path.isdir(os.path.join(root, "train")):
      items = folder_layout.class_folder_items(root, split)
  except folder_layout.LayoutError as e:
    raise DataError(str(e)) from None
  if items is None:
    path = os.path.join(root, f"{folder_layout.parse_split(split)[0]}.txt")
    have = sorted(os.path.basename(f) for f in glob.glob(f"{root}/*.txt"))
    raise DataError(
      f"Split file {path!r} is missing (found: {have or 'no .txt files'})."
    )
  return items


class FolderSource(Sequence):
  """A folder dataset: split files or class folders (`folder_layout`).

  ``<root>/<split>.txt`` holds one ``relative/path.jpg <int label>`` per
  line, paths relative to ``root`` (NOAH / SSF layout; docs/references.md,
  "VTAB-1k: extracted folders"); without it,
  ``<root>/<split>/<class>/*.jpg`` class folders are read. A split may
  carry a slice (``train[:80%]``).
  """

  def __init__(self, root: str, split: str):
    self.root = root
    self.items: list[tuple[str, int]] = folder_items(root, split)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i):
    rel, label = self.items[i]
    full = os.path.join(self.root, rel)
    try:
      with Image.open(full) as im:
        image = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
      raise DataError(f"Cannot read image {full!r}: {e}") from e
    return {"image": image, "label": label}

  def __getitems__(self, idx):
    return [self[i] for i in idx]
