"""Clean stops on Ctrl-C (SIGINT) and on preemption (SIGTERM).

A run can go on for hours on a shared cluster, where a scheduler or a
preemptible VM ends a job with SIGTERM and a person with Ctrl-C. Inside
`handling` (every run's `vptpc.lifecycle.entry`, and the whole of
``python -m vptpc.main``) both signals raise `Stopped` instead of killing
the process or raising a bare KeyboardInterrupt:

* Where a checkpoint can be written at the current step (a training loop,
  a vmapped grid's epoch loop: code inside `deferred`), the signal is only
  recorded; the loop finishes its step (or scanned epoch), writes a
  checkpoint, and raises `Stopped` itself (`pending`).
* Anywhere else (reading data, compiling, scoring prompts for
  condensation, between the seeds of a protocol), `Stopped` is raised at
  once: nothing there is lost that the last checkpoint or the finished
  stages do not hold, and the run's lock is released on the way out.
* A second signal while a stop is pending ends the process at once,
  without waiting for the step to finish (a checkpoint is not written).

``python -m vptpc.main`` turns `Stopped` into one line on stderr, saying
where the run stopped and that the same command resumes, and exits with
the shell's convention for the signal: 130 for SIGINT, 143 for SIGTERM.
The resumed run ends with the same bits as an uninterrupted one.

`Stopped` is a KeyboardInterrupt, so code (and notebooks) that already
handle Ctrl-C keep working. Handlers are installed only from the main
thread, and the previous ones are put back when `handling` exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
  """A run stopped by a signal; its message says where and what is kept.

  Attributes:
    signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    where: what was running, e.g. ``training runs/x at step 37 of 320``.
    kept: what a resume starts from, e.g. ``a checkpoint at step 37``.
  """

  def __init__(self, signum: int, where: str, kept: str = ""):
    self.signum, self.where, self.kept = int(signum), where, kept
    super().__init__(self.line())

  @property
  def exit_status(self) -> int:
    """The shell's status for a process ended by the signal: 128 + n."""
    return 128 + self.signum

  def line(self) -> str:
    """The one line a user sees."""
    kept = f"; {self.kept}" if self.kept else ""
    return (
      f"stopped by {signal.Signals(self.signum).name} {self.where}{kept}. "
      "Run the same command to resume."
    )


# Process-wide state: how many `handling` blocks are open and the handlers
# they replaced, how many `deferred` blocks, the signal waiting for the
# next safe point, and what is running (for stops raised at once).
_STATE = {"depth": 0, "previous": {}, "deferred": 0, "pending": None}
_STAGE: list[str] = []


def _handler(signum, frame) -> None:
  del frame
  if _STATE["pending"] is not None:
    # A second signal: the user does not want to wait for the step.
    name = signal.Signals(signum).name
    print(
      f"stopped at once by a second {name}, without a checkpoint at this "
      "step; the same command resumes from the last one.",
      file=sys.stderr,
      flush=True,
    )
    os._exit(128 + signum)
  _STATE["pending"] = signum
  if _STATE["deferred"]:
    return
  where = _STAGE[-1] if _STAGE else "while the run was starting"
  raise Stopped(signum, where)


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """Turns SIGINT and SIGTERM into `Stopped` within the block (re-entrant).

  Off the main thread (where Python cannot install handlers) this does
  nothing and the signals keep their previous behaviour.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _STATE["depth"] == 0:
    _STATE["previous"] = {s: signal.getsignal(s) for s in SIGNALS}
    _STATE["pending"] = None
    for s in SIGNALS:
      signal.signal(s, _handler)
  _STATE["depth"] += 1
  try:
    yield
  finally:
    _STATE["depth"] -= 1
    if _STATE["depth"] == 0:
      for s, h in _STATE["previous"].items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)
      _STATE["pending"] = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Within the block a signal is recorded for `pending`, not raised.

  For loops that check `pending` after every step and write a checkpoint
  before they stop. A signal still pending when the block ends (the loop
  had no safe point left) is raised there, with the innermost `stage`.
  """
  _STATE["deferred"] += 1
  try:
    yield
  finally:
    _STATE["deferred"] -= 1
  if not _STATE["deferred"] and _STATE["pending"] is not None:
    raise Stopped(
      _STATE["pending"], _STAGE[-1] if _STAGE else "at the end of a stage"
    )


@contextlib.contextmanager
def stage(where: str) -> Iterator[None]:
  """Names what runs inside the block, for a stop raised there.

  ``where`` completes "stopped by SIGINT ...", e.g. ``while scoring the
  prompts of runs/x for condensation (the first stage is finished)``.
  """
  _STAGE.append(where)
  try:
    yield
  finally:
    _STAGE.pop()


def pending() -> int | None:
  """The signal waiting for this safe point, or None."""
  return _STATE["pending"]
