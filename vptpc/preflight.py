"""Preconditions of a run, all checked before anything is written.

`check` looks at everything a run will need and raises one
`PreflightError` listing every missing or bad item, each with the setting
or command that fixes it, before any dataset is generated, any directory
created or any file written (vptpc.rundir calls it from the outermost entry
point of a process):

* the config: every invalid value (`vptpc.config_util.problems`);
* the workdir: not a file, creatable and writable (probed with a temporary
  directory that is removed at once); a URL (``gs://``) workdir or
  checkpoint is refused (`vptpc.lifecycle.local_workdir`: vptpc works on
  local or mounted paths);
* the backbone checkpoint: present, a zip archive whose members are
  readable ``.npy`` headers, with vit_jax keys, or a ``.safetensors`` file
  whose JSON header names timm keys of the model's family (ViT or Swin;
  read from the archive's directory and headers, never its data, so a
  350 MB file costs milliseconds; shapes are checked against the model
  when it is loaded, still before the workdir is touched);
* the data: a prepared TFDS dataset with the split names asked for, or a
  folder layout whose split files parse, whose labels fit
  ``config.data.num_classes``, whose training split holds at least two
  classes and no class folder without images, whose listed images exist
  and open
  (``config.data.verify_images``: PIL's header check by default, about
  0.1 s per 3,000 files; a split too large to cache is decoded per batch,
  so a corrupt image would otherwise stop the run mid-way) (vptpc's own
  generated datasets are fine: they are generated on first use, after these
  checks);
* the devices: a batch that divides over the devices ``config.parallel``
  will use;
* every stage the run will write (the grid points of ``mode=tune``, the
  seeds of ``mode=final``, the two stages of Prompt Condensation): a stored
  ``config.json`` that differs in a key that cannot change mid-run
  (`vptpc.config_util.SAFE_TO_CHANGE`), unless ``config.overwrite``; an
  ``eval_only`` run without a checkpoint; a prompts file the run will read
  (a condensation's ``full/prompts.npz``, a finished stage evaluated again)
  that does not load or does not fit the run's backbone: width (per block
  for Swin), depth and head from the file's and the checkpoint's array
  headers, milliseconds; when those fit, the recorded fingerprint against
  the checkpoint as the run loads it (`run_fingerprint`, about 1 s for
  ViT-B/16, paid only on these paths);
* the lock: another live run on the same workdir (`vptpc.rundir`);
* ``protocol.tuned_from``: present and readable.

Only then does the run generate data, read the backbone and create the
workdir.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import sys
import tempfile
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vptpc import (
  build,
  checkpoint,
  config_util,
  hub,
  npz_checkpoint,
  parallel,
  prompts,
  protocol_runs,
  rundir,
  timm_checkpoint,
)
from vptpc.data import sources, vtab
from vptpc.models import registry, vit


class PreflightError(ValueError):
  """Unmet preconditions of a run; ``problems`` holds one line each."""

  def __init__(self, problems: list[str]):
    """Keeps every problem; the message is one line per problem."""
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


def exit_with(lines: list[str] | str) -> None:
  """Prints one ``error:`` line per problem and exits with status 2.

  A string is one problem; its further lines are indented under the first.
  The command-line entry points (`vptpc.main`, `vptpc.suite`,
  `vptpc.pretrain`) end this way on bad input.
  """
  if isinstance(lines, str):
    first, *rest = lines.splitlines() or [""]
    lines = [first + "".join(f"\n  {r}" for r in rest)]
  for line in lines:
    print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(2)


@dataclasses.dataclass
class Stage:
  """One workdir a run writes: its config, and what kind of entry it is."""

  config: ml_collections.ConfigDict
  workdir: str
  kind: str  # stage | pc


@dataclasses.dataclass
class Plan:
  """What `check` found: the stages, the data in use, warnings."""

  stages: list[Stage]
  data: list[str]
  warnings: list[str]


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
  """Every workdir the run writes, with the config it will store there."""
  mode = config.protocol.mode
  if mode in ("tune", "final"):
    runs = (
      protocol_runs.tune_runs(config, workdir)
      if mode == "tune"
      else protocol_runs.final_runs(config, workdir)
    )
    if mode == "tune" and config.protocol.get("vmap", False):
      return [Stage(c, d, "stage") for c, d in runs]
    return [s for c, d in runs for s in stages(c, d)]
  if config.condense.keep > 0:
    return [
      Stage(config, workdir, "pc"),
      Stage(config, os.path.join(workdir, "full"), "stage"),
      Stage(
        config_util.finetune_config(config),
        os.path.join(workdir, "condensed"),
        "stage",
      ),
    ]
  return [Stage(config, workdir, "stage")]


def _is_remote(path: str) -> bool:
  return "://" in path


def _local(path: str) -> str:
  """A hub reference as its cached file ("" when not cached: named elsewhere)."""
  try:
    return hub.local_path(path)
  except hub.HubError:
    return ""


def _main_process() -> bool:

  return jax.process_index() == 0


def dir_problems(path: str, name: str, fix: str) -> list[str]:
  """``path`` is a directory, or can be created, and is writable.

  Args:
    path: the directory.
    name: how messages name it (``--workdir=...``).
    fix: what to pass instead.
  """
  if _is_remote(path):
    return []
  if os.path.lexists(path) and not os.path.isdir(path):
    return [f"{name} is an existing file, not a directory: {fix}."]
  probe_in = path
  while not os.path.exists(probe_in):
    parent = os.path.dirname(probe_in)
    if parent == probe_in:
      break
    probe_in = parent
  if not os.path.isdir(probe_in):
    return [f"{name} cannot be created: {probe_in} is a file: {fix}."]
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".vptpc-probe-", dir=probe_in))
  except OSError as e:
    what = "written" if probe_in == path else "created"
    return [
      f"{name} cannot be {what}: {probe_in} is not writable "
      f"({type(e).__name__}: {e.strerror or e}): {fix}."
    ]
  return []


def workdir_problems(workdir: str) -> list[str]:
  """The workdir is a directory, or can be created, and is writable."""
  return dir_problems(
    workdir,
    f"--workdir={workdir}",
    "pass a directory path in a writable place (an existing run's or a new "
    "one)",
  )


_CKPT_FIX = (
  "download the vit_jax .npz yourself (vptpc never downloads it; e.g. "
  "ViT-B_16.npz from gs://vit_models/imagenet21k/) and pass its path as "
  "--config.model.checkpoint_path=PATH (configs/vtab.py: checkpoint=PATH)"
)


def _family(model_name: str) -> str | None:
  try:
    return registry.model_family(model_name) if model_name else None
  except ValueError:
    return None  # config_util.problems names the bad name


def _fix(family: str | None) -> str:
  """What to do about a missing or wrong file, in the family's words."""
  return registry.family(family).CHECKPOINT_FIX if family else _CKPT_FIX


def safetensors_problems(path: str, key: str, family: str | None) -> list[str]:
  """A ``.safetensors`` file parses and holds the model family's timm keys.

  Reads only the 8-byte length and the JSON header (the tensor names),
  never the data.
  """
  fix = _fix(family)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      size = os.path.getsize(path)
      if not 2 <= n <= min(size - 8, 100 * 2**20):
        raise ValueError(f"header length {n} does not fit the file")
      header = json.loads(f.read(n))
      names = [k for k in header if k != "__metadata__"]
      # The tensors' byte ranges must end where the file does: a download
      # cut short keeps its header.
      end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k in names),
        default=0,
      )
      if end != size - 8 - n:
        raise ValueError(
          f"its tensors need {end} bytes after the header, the file has "
          f"{size - 8 - n}"
        )
  except OSError as e:
    return [f"{key} cannot be read ({e.strerror}): fix its permissions."]
  except (ValueError, struct.error, UnicodeDecodeError) as e:
    return [
      f"{key} is not a readable .safetensors file (truncated or another "
      f"format: {e}): {fix}."
    ]
  arch = timm_checkpoint.file_kind(names)
  if family is not None and arch != family:
    what = timm_checkpoint.kind_words(arch)
    return [
      f"{key} is {what} checkpoint but config.model.name names a "
      f"{registry.family(family).DISPLAY} "
      f"(first keys: {', '.join(sorted(names)[:3])}): {fix}."
    ]
  return []


def timm_fit_problems(config: ml_collections.ConfigDict) -> list[str]:
  """A timm ``.safetensors`` checkpoint fits the named model (headers only).

  Every parameter of the run's model has its tensor, of the shape the name
  and ``config.model.arch`` imply, and the file holds nothing else
  (`vptpc.timm_checkpoint.timm_fit`); one line, the offenders counted.
  """
  path = _local(config.model.checkpoint_path)
  if not path.endswith(".safetensors") or not os.path.isfile(path):
    return []
  try:
    template = _backbone_template(config)
    want = npz_checkpoint.flatten(template)
    arch = registry.family_of_tree(template).NAME
    shapes = timm_checkpoint.timm_names(
      checkpoint.read_shapes(path), want, arch
    )
    fit = timm_checkpoint.timm_fit(shapes, want, arch)
  except Exception:  # noqa: BLE001 - the other checks name what is wrong
    return []
  if fit.ok:
    return []
  return [
    f"config.model.checkpoint_path={config.model.checkpoint_path!r} does not "
    f"fit config.model.name={config.model.name!r}: {fit.summary()}; check "
    "the model name (and config.model.arch) against the file."
  ]


def checkpoint_problems(path: str, model_name: str = "") -> list[str]:
  """The checkpoint file exists and fits the model (headers only).

  A vit_jax ``.npz`` (ViT) or a timm ``.safetensors`` (ViT or Swin). With
  ``model_name`` (``config.model.name``) the messages name the file the
  model's family needs, and a file of the other family is refused.
  """
  if not path:
    return []
  family = _family(model_name)
  key = f"config.model.checkpoint_path={path!r}"
  if hub.is_hub_ref(path):
    # Weights by name: only the local hub cache is read at run time.
    try:
      path = hub.local_path(path)
    except hub.HubError as e:
      return [f"{key}: {e}"]
  if _is_remote(path):
    # Nothing is downloaded at run time, and the readers open local files.
    return [
      f"{key} is a URL: vptpc reads checkpoints from local files only "
      "(nothing is downloaded at run time): copy it locally (e.g. gsutil cp "
      "or gcloud storage cp) and pass that path."
    ]
  fix = _fix(family)
  if not os.path.exists(path):
    return [f"{key} does not exist: {fix}."]
  if os.path.isdir(path):
    return [f"{key} is a directory, not a checkpoint file: {fix}."]
  if path.endswith(".safetensors"):
    return safetensors_problems(path, key, family)
  if family is not None and not registry.family(family).READS_NPZ:
    return [
      f"{key}: a {registry.family(family).DISPLAY} reads a timm "
      f".safetensors file, not a vit_jax .npz: {fix}."
    ]
  try:
    with open(path, "rb"):
      pass
  except OSError as e:
    return [f"{key} cannot be read ({e.strerror}): fix its permissions."]
  if not zipfile.is_zipfile(path):
    return [
      f"{key} is not a .npz archive (not a zip file: truncated, corrupt or "
      f"another format): {_CKPT_FIX}."
    ]
  try:
    with zipfile.ZipFile(path) as z:
      names = [n.removesuffix(".npy") for n in z.namelist()]
      read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
      }
      for info in z.infolist():
        with z.open(info) as f:
          version = np.lib.format.read_magic(f)
          if version in read:
            read[version](f)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    return [
      f"{key} is a damaged .npz archive ({type(e).__name__}: {e}): {_CKPT_FIX}."
    ]
  if not any(n.startswith("Transformer/encoderblock_") for n in names):
    return [
      f"{key} is not a vit_jax ViT checkpoint (no "
      f"'Transformer/encoderblock_*' arrays; first: {', '.join(names[:3])}): "
      f"{_CKPT_FIX}."
    ]
  return []


def data_problems(
  config: ml_collections.ConfigDict,
) -> tuple[list[str], list[str], str]:
  """(problems, warnings, one line naming the data) of ``config.data``."""
  d = config.data
  data_dir = d.data_dir or sources.default_data_dir()
  splits = [d.train_split, d.eval_split]
  for key, path in (("data_dir", data_dir), ("folder", d.get("folder", ""))):
    if path and rundir.is_url(path):
      # The readers (TFDS files, folders of images) open local paths.
      return (
        [
          f"config.data.{key}={path} is a URL: vptpc reads datasets with "
          "local file operations: mount the bucket (e.g. gcsfuse) or copy "
          "the prepared dataset locally (gcloud storage cp -r), and pass "
          "that path."
        ],
        [],
        "",
      )
  if d.get("source", "tfds") == "folder":
    root = d.get("folder", "") or (
      vtab.folder_root(data_dir, d.task) if d.get("task", "") else ""
    )
    problems, warnings = [], []
    if not root:
      return (
        ["config.data.source=folder needs config.data.folder (or data.task)."],
        [],
        "",
      )
    for split in dict.fromkeys(splits):
      p, w = sources.folder_problems(root, split, d.num_classes)
      problems += p
      warnings += w if split == d.train_split else []
      problems += sources.image_problems(
        root, split, d.get("verify_images", "header")
      )
    p, w = sources.class_problems(root, d.train_split, [d.eval_split])
    return problems + p, warnings + w, f"{d.name}: folder {root}"
  base = d.name.split(":")[0]
  where = describe = sources.describe_data_dir(data_dir)
  if base in sources.LOCAL_BUILDERS:
    if sources.prepared_dir(d.name, data_dir) is None:
      problems = dir_problems(
        data_dir,
        f"data_dir {data_dir}",
        "set config.data.data_dir (or $TFDS_DATA_DIR) to a writable "
        "directory; vptpc generates its own datasets there",
      )
      return (
        problems,
        [],
        f"{d.name} in {describe}: generated there on first use, nothing is "
        "downloaded",
      )
    problems = []
    for split in dict.fromkeys(splits):
      problems += sources.split_problems(d.name, split, data_dir)
    return problems, [], f"{d.name} in {where} (generated by vptpc)"
  if sources.prepared_dir(d.name, data_dir) is None:
    return [sources.missing_message(d.name, data_dir)], [], ""
  problems = []
  for split in dict.fromkeys(splits):
    problems += sources.split_problems(d.name, split, data_dir)
  return problems, [], f"{d.name} in {where}"


def device_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The batch sizes divide over the devices ``config.parallel`` uses."""
  if config.protocol.mode == "tune" and config.protocol.get("vmap", False):
    return []  # a vmapped grid runs under jit
  out = []
  try:  # the mode alone: batch sizes are checked below, both at once
    mode = parallel.resolve_mode(config.parallel, jax.device_count())
  except ValueError as e:
    return [str(e)]
  if mode != "pmap":
    return []
  n = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    b = config[key]
    if isinstance(b, int) and b > 0 and b % n:
      out.append(
        f"config.{key}={b} does not divide over the {n} devices that "
        f"config.parallel={config.parallel} uses (pmap): set "
        f"--config.{key} to a multiple of {n}, or --config.parallel=jit."
      )
  return out


def _has_checkpoint(workdir: str) -> bool:
  return any(
    os.path.basename(p).isdigit()
    for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
  )


def run_backbone(
  config: ml_collections.ConfigDict,
) -> tuple[dict[str, Any], str]:
  """(dims, source) of the backbone a run will use, no weights read.

  From the checkpoint's array headers (`vptpc.checkpoint.read_shapes`,
  milliseconds for ViT-B/16) or, without a checkpoint, from the model's
  shapes (`jax.eval_shape`, nothing initialised). ``dims`` holds what
  `vptpc.prompts.save_prompts` records except the fingerprint; it is
  ``{}`` when the checkpoint cannot be read (`checkpoint_problems` says
  why).
  """
  path = config.model.checkpoint_path
  if path:
    source = f"config.model.checkpoint_path={path!r}"
    path = _local(path)
    if _is_remote(path) or not os.path.isfile(path):
      return {}, source
    try:
      return checkpoint.backbone_dims(checkpoint.read_shapes(path)), source
    except npz_checkpoint.CheckpointError:
      return {}, source

  try:
    dims = prompts._backbone_meta(_backbone_template(config), fingerprint=False)  # noqa: SLF001
  except Exception:  # noqa: BLE001 - an invalid model config is reported elsewhere
    return {}, f"config.model.name={config.model.name!r}"
  return dims, f"config.model.name={config.model.name!r} (random init)"


def _backbone_template(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's backbone as shapes (`jax.eval_shape`: nothing initialised).

  Raises:
    ValueError: an invalid model config (reported by the config checks).
  """
  size = config.data.image_size
  model = build.build_model(config)
  shapes = jax.eval_shape(
    lambda r: model.init(r, jax.numpy.zeros((1, size, size, 3)))["params"],
    jax.random.key(0),
  )
  return vit.split_head(shapes)[0]


def run_fingerprint(config: ml_collections.ConfigDict) -> str | None:
  """`vptpc.prompts.backbone_fingerprint` of the run's checkpoint, or None.

  The fingerprint hashes the loaded tree (position embedding resized to
  the run's image size, timm tensors transposed), so it is computed exactly
  as the run will load the backbone: the model's template by
  `jax.eval_shape` (no initialisation) and `vptpc.checkpoint.load_pretrained`.
  That reads every array: about 1 s for a ViT-B/16 .npz from the page
  cache (`benchmarks/preflight_prompt_cost.py`: 0.6 to 1.0 s), which is why
  `prompt_file_problems` calls it only when a prompt file will be read and
  its shapes fit. None for a random-init backbone or an unreadable file.
  """
  path = _local(config.model.checkpoint_path)
  if not path or _is_remote(path) or not os.path.isfile(path):
    return None

  try:
    backbone = checkpoint.load_pretrained(path, _backbone_template(config))
  except Exception:  # noqa: BLE001 - the stage's own load reports it
    return None
  return prompts.backbone_fingerprint(backbone)


def prompt_file_problems(
  path: str, config: ml_collections.ConfigDict, why: str
) -> list[str]:
  """A prompt file the run will read does not fit the run's backbone.

  Shapes first, from headers only (`vptpc.prompts.read_prompt_file`,
  `run_backbone`): width (per block for Swin), depth, head width. Only when
  they fit, and the file records a fingerprint, is the checkpoint read to
  compare it (`run_fingerprint`): same shapes, other weights (an augreg
  file in place of the ImageNet-21k one, a relative checkpoint path read
  from another directory).

  Args:
    path: the prompt file.
    config: the config of the stage that reads it.
    why: what reads it, for the message.

  Returns:
    One line per problem: the file, the field, both values, the fix.
  """
  fix = (
    f"{why}: run with the backbone it was trained with, or pass "
    "--config.overwrite=True to train afresh"
  )
  try:
    shapes, head, meta = prompts.read_prompt_file(path)
  except prompts.PromptFileError as e:
    return [f"{e} {why}: pass --config.overwrite=True to train afresh."]
  want, source = run_backbone(config)
  if not want:
    return []
  saved = meta.get("backbone") or {}
  if "widths" in saved and "widths" not in want:
    return [
      f"prompt file {path} was trained on a Swin backbone (arch swin in the "
      f"file vs a ViT in {source}); {fix}."
    ]
  misfits = prompts.fit_problems(shapes, head, meta, want)
  if not misfits and saved.get("fingerprint"):
    now = run_fingerprint(config)
    if now:
      misfits = prompts.fit_problems(
        shapes, head, meta, dict(want, fingerprint=now)
      )
  out = []
  for m in misfits:
    what = " (same shapes, other weights)" if m.field == "fingerprint" else ""
    out.append(
      f"prompt file {path} was trained on another backbone{what}: {m.field} "
      f"{m.in_file} in the file vs {m.backbone} in {source}; {fix}."
    )
  return out


def stage_problems(stage: Stage) -> list[str]:
  """A changed config, a missing checkpoint for eval_only, a bad export."""
  out = []
  c, d = stage.config, stage.workdir
  if not c.get("overwrite"):
    diff = rundir.changes(c, d, stage.kind)
    if diff and diff[0]:
      out.append(rundir.changed_message(d, diff[0]))
  if stage.kind == "stage" and c.get("eval_only") and not _has_checkpoint(d):
    out.append(
      f"config.eval_only=True but {os.path.join(d, 'checkpoints')} holds no "
      "checkpoint: train first (drop --config.eval_only)."
    )
  export = os.path.join(d, "prompts.npz")
  if (
    stage.kind == "stage"
    and not c.get("overwrite")
    and os.path.exists(os.path.join(d, "results.json"))
    and os.path.exists(export)
  ):
    if os.path.basename(d) == "full":
      done = rundir.finished(c, os.path.dirname(d), "pc")
      why = (
        "" if done and "condensed" in done else "Prompt Condensation reads it"
      )
    elif rundir.finished(c, d, "stage") is None:
      why = "this run evaluates that stage's checkpoint again"
    else:
      why = ""  # finished with this config: only its results are read
    if why:
      out += prompt_file_problems(export, c, why)
  return out


def check(config: ml_collections.ConfigDict, workdir: str) -> Plan:
  """Checks every precondition of a run (module docstring); writes nothing.

  Returns:
    The `Plan`: stages, a line per dataset naming its directory, warnings.

  Raises:
    PreflightError: listing every unmet precondition, one line each.
  """
  problems = list(config_util.problems(config))
  problems += workdir_problems(workdir)
  try:
    planned = stages(config, workdir)
  except (OSError, ValueError, KeyError) as e:
    problems.append(str(e))
    planned = [Stage(config, workdir, "stage")]
  problems += checkpoint_problems(
    config.model.checkpoint_path, config.model.name
  )
  if not problems:
    problems += timm_fit_problems(config)
  data, warnings, seen = [], [], set()
  for s in planned:
    key = json.dumps(s.config.data.to_dict(), sort_keys=True, default=str)
    if key in seen:
      continue
    seen.add(key)
    p, w, line = data_problems(s.config)
    problems += [x for x in p if x not in problems]
    warnings += [x for x in w if x not in warnings]
    if line and line not in data:
      data.append(line)
  if not config_util.problems(config):
    problems += device_problems(config)
  for s in planned:
    problems += stage_problems(s)
  if not _is_remote(workdir) and _main_process():
    # Process 0 alone takes the lock; the others of a multi-process run
    # would find it held by their own run.
    held = rundir.holder(workdir)
    if held is not None:
      problems.append(rundir._locked_message(workdir, held))  # noqa: SLF001
  if problems:
    raise PreflightError(problems)
  return Plan(planned, data, warnings)


def log_plan(plan: Plan) -> None:
  """Logs the data in use (naming its directory) and the warnings."""
  for line in plan.data:
    logging.info("Data: %s.", line)
  for w in plan.warnings:
    logging.warning("%s", w)


def summary(plan: Plan) -> dict[str, Any]:
  """A JSON-able view of a plan (tests, the fault sweep)."""
  return {
    "stages": [(s.kind, s.workdir) for s in plan.stages],
    "data": plan.data,
    "warnings": plan.warnings,
  }
