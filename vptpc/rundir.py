"""One run per workdir: its lock, its stored config, and starting afresh.

Every entry point that writes a workdir (`vptpc.protocol.run`,
`vptpc.train.train_and_evaluate`, `vptpc.train.train_stage`) runs inside
`vptpc.lifecycle.entry`, which uses this module's pieces:

1. The outermost entry of a process checks every precondition first
   (`vptpc.preflight.check`: config, workdir, checkpoint, data, devices,
   a changed config, a live lock) and raises one error listing all of them
   before anything is generated, created or written.
2. `Run.start`, called once the run's inputs are loaded, takes the lock,
   creates the workdir, moves an old run aside when ``config.overwrite`` is
   set, compares the stored ``config.json`` with the new config (see
   `vptpc.config_util.SAFE_TO_CHANGE`) and writes it.
3. On the way out the lock is released; after an error, the directories
   this entry created are removed again if they are still empty, so a run
   that fails on its inputs leaves nothing behind.

The lock is ``<workdir>/.vptpc.lock``: an exclusive ``flock`` held while
the run lives (the kernel drops it when the process dies, ``kill -9``
included) on a file naming the holder's pid, host, start time and a random
token. A second run on the same workdir refuses with the holder named; a
lock file whose holder is gone is taken over with a warning. Nested entries
of one process (the stages of a run) share it.

Across hosts ``flock`` holds only where the filesystem passes it to a
server: local disks, NFSv4, NFSv3 with NLM. It does not on NFS mounted
``nolock`` or ``local_lock=all``, Lustre's ``localflock``, or gcsfuse,
where a second host gets the ``flock`` too. So the lock file is also a
lease: the holder touches it every `HEARTBEAT_S` seconds, and a run that
gets the ``flock`` but finds another host's record touched less than
`LEASE_S` seconds ago refuses (a record older than that is a dead run's and
is taken over). After writing its record a run reads it back through a new
open and refuses if another run's token is there (two hosts taking a free
lock at the same moment). What remains: two hosts that both find the lock
free and both read back their own record within the same instant, and
clocks more than `LEASE_S` apart (the age is the file's mtime, set by the
file server, against the reader's clock).

A URL workdir (``gs://...``) is refused up front: the workdir is written
with local file operations (the lock, ``config.json``, metrics, exports),
so ``os.path.abspath`` would turn it into a local directory named ``gs:``.
Mount the bucket (gcsfuse) or use a shared filesystem path instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from vptpc import config_util, moved, records

LOCK = ".vptpc.lock"
# The holder touches its lock file this often; a record from another host
# touched within LEASE_S is a live run (module docstring).
HEARTBEAT_S = 30.0
LEASE_S = 120.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir's lock."""


def is_url(path: str) -> bool:
  """Whether ``path`` is a URL (``gs://``, ``s3://``, ...), not a local path."""
  return bool(_URL.match(os.fspath(path)))


def url_message(name: str, path: str) -> str:
  """The error for a URL where vptpc needs a local (or mounted) path."""
  scheme = os.fspath(path).split("://", 1)[0]
  return (
    f"{name}={path} is a {scheme}:// URL, but vptpc reads and writes its "
    "workdir with local file operations (the run lock, config.json, "
    "metrics, checkpoints' bookkeeping, exports), so it would become a "
    f"local directory named '{scheme}:': mount the bucket (e.g. gcsfuse) "
    "or use a shared filesystem path, and pass that path."
  )


# ---------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None.

  Stored beside the pid so that a reused pid is not mistaken for the
  holder.
  """
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def read_lock(workdir: str) -> dict[str, Any] | None:
  """The holder recorded in ``<workdir>/.vptpc.lock`` (None: no file)."""
  try:
    with open(os.path.join(workdir, LOCK)) as f:
      text = f.read()
  except (FileNotFoundError, NotADirectoryError):
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {}  # a holder killed while writing it


def describe(info: dict[str, Any] | None) -> str:
  """``pid 12 on host h since 2024-01-01 10:00:00 (python -m ...)``."""
  if not info:
    return "an unknown process"
  since = time.strftime(
    "%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0))
  )
  cmd = " ".join(info.get("argv", []))[:120]
  return f"pid {info.get('pid')} on host {info.get('host')} since {since}" + (
    f" ({cmd})" if cmd else ""
  )


def holder(workdir: str) -> dict[str, Any] | None:
  """The live run holding ``workdir``'s lock, or None if it is free.

  Reads only: the lock file is opened read-only and its ``flock`` tried
  and dropped at once.
  """
  path = os.path.join(workdir, LOCK)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return read_lock(workdir) or {}
  finally:
    os.close(fd)  # also drops a lock taken above
  return _live_elsewhere(workdir)


def _age(path: str) -> float | None:
  """Seconds since ``path`` was last touched (its mtime), or None."""
  try:
    return time.time() - os.stat(path).st_mtime
  except OSError:
    return None


def _live_elsewhere(workdir: str) -> dict[str, Any] | None:
  """Another host's lock record touched within `LEASE_S`, or None.

  Its ``flock`` did not stop us, so the filesystem does not pass locks
  between hosts; the record's heartbeat says whether that run lives.
  """
  info = read_lock(workdir)
  age = _age(os.path.join(workdir, LOCK))
  if (
    info
    and info.get("host") not in (None, socket.gethostname())
    and age is not None
    and age < LEASE_S
  ):
    return dict(info, heartbeat_age_s=round(age, 1))
  return None


def _locked_message(workdir: str, info: dict[str, Any] | None) -> str:
  if info and "heartbeat_age_s" in info:
    return (
      f"workdir {workdir} is in use by {describe(info)}: its lock file "
      f"{os.path.join(workdir, LOCK)} was touched {info['heartbeat_age_s']} "
      "s ago, though this filesystem let us take the flock too (NFS "
      "mounted nolock or local_lock, gcsfuse: locks do not span hosts). "
      "Wait for that run to end or use another --workdir; if it is dead, "
      f"wait {LEASE_S:.0f} s after its last heartbeat or delete the lock "
      "file."
    )
  return (
    f"workdir {workdir} is in use by {describe(info)} (lock file "
    f"{os.path.join(workdir, LOCK)}): wait for that run to end, or use "
    "another --workdir."
  )


# Locks this process holds: realpath -> [fd, depth, token, stop event].
_HELD: dict[str, list[Any]] = {}


def _read_back(path: str) -> dict[str, Any]:
  """The lock record as a fresh open sees it (NFS: close-to-open)."""
  try:
    with open(path) as f:
      return json.loads(f.read())
  except (OSError, ValueError):
    return {}


def _heartbeat(path: str, token: str, stop: threading.Event) -> None:
  """Touches the lock file every `HEARTBEAT_S` until ``stop`` is set.

  Warns (once) if the file stops holding this run's token: another host
  took the workdir, which a filesystem without cross-host locks allows.
  """
  warned = False
  while not stop.wait(HEARTBEAT_S):
    with contextlib.suppress(OSError):
      os.utime(path)
    rec = _read_back(path)
    if rec and rec.get("token") != token and not warned:
      warned = True
      logging.error(
        "The lock file %s now names %s: another run took this workdir; "
        "two runs writing it corrupt each other's checkpoints. Stop one.",
        path,
        describe(rec),
      )


def acquire(workdir: str) -> None:
  """Takes ``workdir``'s lock (creating the directory), re-entrantly.

  Raises:
    WorkdirLocked: a live process holds it (named).
  """
  real = os.path.realpath(workdir)
  if real in _HELD:
    _HELD[real][1] += 1
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  for _ in range(5):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirLocked(
        _locked_message(workdir, read_lock(workdir))
      ) from None
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the holder removed the file as we opened it; again
  else:
    raise WorkdirLocked(_locked_message(workdir, read_lock(workdir)))
  live = _live_elsewhere(workdir)
  if live is not None:  # flock does not span hosts here (module docstring)
    os.close(fd)
    raise WorkdirLocked(_locked_message(workdir, live))
  previous = os.read(fd, 1 << 16).decode(errors="replace").strip()
  if previous:
    try:
      old = json.loads(previous)
    except ValueError:
      old = {}
    logging.warning(
      "Took over the stale lock of %s on %s: that process is gone (killed "
      "or crashed); resuming from what it left.",
      describe(old),
      workdir,
    )
  token = secrets.token_hex(8)
  info = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "start": _proc_start(os.getpid()),
    "since": time.time(),
    "argv": sys.argv,
    "token": token,
  }
  os.lseek(fd, 0, os.SEEK_SET)
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps(info).encode())
  os.fsync(fd)
  back = _read_back(path)
  if back.get("token") != token:
    # Another host wrote its record after ours: it holds the workdir.
    os.close(fd)
    raise WorkdirLocked(_locked_message(workdir, back or None))
  stop = threading.Event()
  threading.Thread(
    target=_heartbeat, args=(path, token, stop), daemon=True
  ).start()
  _HELD[real] = [fd, 1, token, stop]


def release(workdir: str) -> None:
  """Drops one hold of ``workdir``'s lock; the last removes the file."""
  real = os.path.realpath(workdir)
  if real not in _HELD:
    return
  _HELD[real][1] -= 1
  if _HELD[real][1] > 0:
    return
  fd, _, token, stop = _HELD.pop(real)
  stop.set()
  path = os.path.join(workdir, LOCK)
  # Another host's record (a filesystem without cross-host locks) stays.
  if _read_back(path).get("token") in (token, None):
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  os.close(fd)


# ---------------------------------------------------------------------------
# Stored configs and starting afresh.
# ---------------------------------------------------------------------------


def stored_config(workdir: str) -> dict[str, Any] | None:
  """``<workdir>/config.json``, or None when there is none (or unreadable)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _ignores(kind: str) -> tuple[str, ...]:
  """Subtrees a workdir of ``kind`` does not compare (config_util)."""
  if kind == "stage":
    return config_util.STAGE_IGNORES
  return ("protocol",)


def changes(
  config: ml_collections.ConfigDict, workdir: str, kind: str
) -> tuple[list, list] | None:
  """(unsafe, safe) changes against the stored config; None if none stored."""
  stored = stored_config(workdir)
  if stored is None:
    return None
  return config_util.changed_keys(
    stored, config.to_dict(), ignore=_ignores(kind)
  )


def changed_message(workdir: str, unsafe: list) -> str:
  """The error for a workdir whose run used another config."""
  return (
    f"workdir {workdir} holds a run of another config, which cannot change "
    f"mid-run: {config_util.describe_changes(unsafe)} (stored -> now). Run "
    "with the stored values to resume it, pass --config.overwrite=True to "
    "start afresh (the old run is moved aside, not deleted), or use another "
    "--workdir."
  )


def finished(
  config: ml_collections.ConfigDict, workdir: str, kind: str
) -> dict[str, Any] | None:
  """A finished run's results when ``config`` is exactly its stored one.

  None when there are no results, the stored config differs in any key (a
  safe change re-evaluates), ``config.eval_only`` asks for a new
  evaluation, or ``config.overwrite`` for a new run.
  """
  if config.get("eval_only") or config.get("overwrite"):
    return None
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      res = json.load(f)
  except (OSError, ValueError):
    return None
  diff = changes(config, workdir, kind)
  if diff is None or diff[0] or diff[1]:
    return None
  return res


def _move_aside(workdir: str, items: list[str]) -> str | None:
  """Moves ``items`` (names in ``workdir``) to a timestamped sibling."""
  present = [
    i for i in items if i != LOCK and os.path.lexists(os.path.join(workdir, i))
  ]
  if not present:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  base = os.path.normpath(workdir) + f".old-{stamp}"
  dest, n = base, 1
  while os.path.lexists(dest):
    dest, n = f"{base}-{n}", n + 1
  for item in present:
    target = os.path.join(dest, item)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(workdir, item), target)
  return dest


# ---------------------------------------------------------------------------
# Entries.
# ---------------------------------------------------------------------------


def _is_main_process() -> bool:
  return jax.process_index() == 0


@dataclasses.dataclass
class Run:
  """What an entry holds while it runs in a workdir.

  `vptpc.lifecycle.entry` makes one per entry and closes it on the way out.
  """

  config: ml_collections.ConfigDict
  workdir: str
  kind: str  # stage | pc | protocol
  outermost: bool
  plan: Any = None
  started: bool = False
  created: list[str] = dataclasses.field(default_factory=list)
  locked: bool = False
  moved_to: str | None = None

  def start(self, *, store_config: bool = True) -> None:
    """Locks and creates the workdir; compares and writes ``config.json``.

    Raises:
      WorkdirLocked: another live run holds the workdir.
      ConfigError: the stored config differs in a key that cannot change
        mid-run (and ``config.overwrite`` is not set).
    """
    if self.started:
      return
    self.started = True
    d = self.workdir
    while not os.path.exists(d):
      self.created.append(d)
      parent = os.path.dirname(d)
      if parent == d:
        break
      d = parent
    if _is_main_process():
      acquire(self.workdir)
      self.locked = True
    if self.outermost and self.config.get("overwrite"):
      self.moved_to = _move_aside(self.workdir, self._own_items())
      if self.moved_to:
        print(
          f"config.overwrite=True: moved the previous run in {self.workdir} "
          f"to {self.moved_to}; starting afresh.",
          flush=True,
        )
    if store_config:
      self.store_config()

  def _own_items(self) -> list[str]:
    """What of the workdir this entry's run owns (moved by overwrite)."""
    if self.kind == "protocol":
      mode = self.config.protocol.mode
      if mode == "tune":
        return ["tune", "tune.json", "tune.csv"]
      return ["final", "final.json"]
    return sorted(os.listdir(self.workdir))

  def store_config(self) -> None:
    """Compares the stored ``config.json`` (if any), then writes the new."""
    diff = changes(self.config, self.workdir, self.kind)
    if diff is not None:
      unsafe, safe = diff
      if unsafe and not self.config.get("overwrite"):
        raise config_util.ConfigError(changed_message(self.workdir, unsafe))
      if safe:
        logging.info(
          "%s: settings that are safe to change mid-run changed: %s.",
          self.workdir,
          config_util.describe_changes(safe),
        )
    if _is_main_process():
      records.write_json(
        os.path.join(self.workdir, "config.json"), self.config.to_dict()
      )
      records.write_json(
        os.path.join(self.workdir, "versions.json"), records.versions()
      )

  def close(self, failed: bool) -> None:
    """Releases the lock; after a failure removes what is left empty."""
    if self.locked:
      release(self.workdir)
      self.locked = False
    if failed:
      for d in self.created:  # deepest first
        with contextlib.suppress(OSError):
          os.rmdir(d)


# Spellings from before `vptpc.lifecycle` held the entry: the name, where it
# lives now.
_MOVED = {
  "entry": "vptpc.lifecycle",
  "local_workdir": "vptpc.lifecycle",
}


__getattr__ = moved.forwarder(__name__, _MOVED)
