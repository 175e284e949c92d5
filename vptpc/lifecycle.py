"""How an entry point runs in a workdir: preflight, lock, record, clean-up.

Every entry point that writes a workdir (`vptpc.protocol.run`,
`vptpc.train.train_and_evaluate`, `vptpc.train.train_stage`,
`vptpc.sweep.train_grid`) runs inside `entry`:

1. The outermost entry of a process checks every precondition first
   (`vptpc.preflight.check`) and raises one error listing all of them before
   anything is generated, created or written.
2. `vptpc.rundir.Run.start`, called once the run's inputs are loaded, takes
   the workdir's lock, creates it, moves an old run aside when
   ``config.overwrite`` is set and records the config.
3. Inside, SIGINT and SIGTERM stop the run cleanly (`vptpc.stops`).
4. On the way out the lock is released; after an error, the directories
   this entry created are removed again if they are still empty.

This module sits above `vptpc.preflight` and `vptpc.rundir`, which know
nothing of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ml_collections

from vptpc import preflight, rundir, stops

# How many entries this process is inside: only the outermost checks
# preconditions, and nested entries (a run's stages) share its lock.
_DEPTH = [0]


def local_workdir(
  workdir: str, config: ml_collections.ConfigDict | None = None
) -> str:
  """``workdir`` made absolute; a URL is refused before anything happens.

  Args:
    workdir: the run's workdir.
    config: the run's config; with a URL workdir its other preflight
      problems are listed too, all at once.

  Raises:
    vptpc.preflight.PreflightError: ``workdir`` is a URL
      (`vptpc.rundir.url_message`).
  """
  if rundir.is_url(workdir):
    problems = [rundir.url_message("--workdir", workdir)]
    if config is not None:
      try:
        preflight.check(config, workdir)
      except preflight.PreflightError as e:
        problems += e.problems
    raise preflight.PreflightError(problems)
  return os.path.abspath(workdir)


@contextlib.contextmanager
def entry(
  config: ml_collections.ConfigDict, workdir: str, *, kind: str
) -> Iterator[rundir.Run]:
  """Runs a workdir's preconditions, lock and clean-up (module docstring).

  Args:
    config: the run's config.
    workdir: its (absolute) workdir.
    kind: ``stage`` (a training stage), ``pc`` (a Prompt Condensation run)
      or ``protocol`` (tune / final).

  Raises:
    vptpc.preflight.PreflightError: listing every unmet precondition (the
      outermost entry only; nothing has been written).
  """
  outermost = _DEPTH[0] == 0
  run = rundir.Run(config, workdir, kind, outermost)
  if outermost:
    run.plan = preflight.check(config, workdir)
    preflight.log_plan(run.plan)
  _DEPTH[0] += 1
  failed = True
  try:
    with stops.handling():
      yield run
    failed = False
  finally:
    _DEPTH[0] -= 1
    run.close(failed)
