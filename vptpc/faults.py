"""Deterministic crashes at named points, for the fault tests and sweep.

``VPTPC_FAULT=<point>[:<n>][@<signal>][,...]`` makes this process kill
itself with SIGKILL (as ``kill -9`` would: no cleanup, no ``finally``) the
``n``-th time (default 1) it reaches ``<point>``; with ``@INT`` or
``@TERM`` it sends itself SIGINT (Ctrl-C) or SIGTERM (a scheduler's
preemption) there instead, for the clean stops of `vptpc.stops`. Unset,
`point` is one dictionary lookup. Points:

* ``train``: after a training step (or a scanned epoch), before the
  checkpoint it may be due to write; counted over the whole process, so a
  Prompt Condensation run's fine-tuning stage continues the count of its
  first stage.
* ``save``: inside a checkpoint save, after every file of the new step is
  written and before Orbax renames its temporary directory into place.
* ``grid_epoch``: after each epoch of a vmapped grid chunk
  (`vptpc.sweep.train_grid`).
* ``final_seed``: in ``protocol.mode=final``, before each seed's run after
  the first (between seeds).
* ``condense``: in a Prompt Condensation run, after the first stage and
  before the prompts are scored.

``VPTPC_FAULT_ENOSPC=<n>`` instead makes the ``n``-th checkpoint save of
the process fail as a full disk would (``OSError(ENOSPC)``, raised where
Orbax writes the checkpoint's metadata).
"""

from __future__ import annotations

import collections
import errno
import os
import signal

ENV = "VPTPC_FAULT"
ENV_ENOSPC = "VPTPC_FAULT_ENOSPC"
POINTS = ("train", "save", "grid_epoch", "final_seed", "condense")

_hits: collections.Counter = collections.Counter()


SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}


def _wanted() -> dict[str, tuple[int, int]]:
  """``{point: (n, signal)}`` from ``$VPTPC_FAULT``."""
  out = {}
  for item in os.environ.get(ENV, "").split(","):
    item = item.strip()
    if not item:
      continue
    item, _, sig = item.partition("@")
    name, _, n = item.partition(":")
    if name not in POINTS:
      raise ValueError(f"{ENV}: unknown point {name!r}; points: {POINTS}.")
    if (sig or "KILL") not in SIGNALS:
      raise ValueError(f"{ENV}: unknown signal {sig!r}; use INT or TERM.")
    out[name] = (int(n or 1), SIGNALS[sig or "KILL"])
  return out


def point(name: str) -> None:
  """Signals this process if ``$VPTPC_FAULT`` asks for it here."""
  if ENV not in os.environ:
    return
  wanted = _wanted()
  if name not in wanted:
    return
  _hits[name] += 1
  n, signum = wanted[name]
  if _hits[name] == n:
    os.kill(os.getpid(), signum)


def armed(name: str) -> bool:
  """Whether ``$VPTPC_FAULT`` names ``name`` (instrumentation is needed)."""
  return ENV in os.environ and name in _wanted()


def disk_full_now() -> bool:
  """Counts a save; whether ``$VPTPC_FAULT_ENOSPC`` makes this one fail."""
  n = os.environ.get(ENV_ENOSPC, "")
  if not n:
    return False
  _hits["enospc"] += 1
  return _hits["enospc"] == int(n)


def disk_full_error(path: str) -> OSError:
  """The error a full disk raises on a write to ``path``."""
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
