"""What a run writes beside its checkpoints: JSON records and versions.

The lowest layer of the run lifecycle: it imports nothing from vptpc, so
every module that writes a run's files (`vptpc.rundir`, `vptpc.train`,
`vptpc.protocol`, `vptpc.sweep`, `vptpc.pretrain`) can use it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
from typing import Any

import jax

# The packages whose versions a run records in ``versions.json``.
PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "tensorflow-datasets",
  "ml-collections",
  "vptpc",
)


def versions() -> dict[str, str | None]:
  """Package versions and the git SHA, for ``versions.json``."""
  out: dict[str, str | None] = {}
  for pkg in PACKAGES:
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  out["git_sha"] = git_sha()
  return out


def git_sha(short: bool = False) -> str | None:
  """The commit of the vptpc checkout in use (None: not a git checkout)."""
  try:
    return subprocess.run(
      ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
      cwd=os.path.dirname(os.path.abspath(__file__)),
      capture_output=True,
      text=True,
      timeout=5,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (a reader sees old or new).

  Only process 0 writes: in a multi-host run the others would write the
  same file.
  """
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
