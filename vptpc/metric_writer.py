"""Metrics to ``metrics.jsonl`` and TensorBoard event files (no TensorFlow).

TensorBoard's own pure-Python event writer is used when the ``tensorboard``
package is installed; otherwise only the JSON-lines file is written.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging

try:
  from tensorboard.compat.proto.event_pb2 import Event
  from tensorboard.compat.proto.summary_pb2 import Summary
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError:  # pragma: no cover - tensorboard is a dependency.
  EventFileWriter = None


def _plain(v: Any) -> Any:
  """Converts numpy/JAX scalars to JSON-friendly Python values."""
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _step_of(line: str) -> float:
  """The step of a JSON-lines record (unparseable lines sort last)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


class MetricWriter:
  """Appends scalar metrics to ``<workdir>/metrics.jsonl`` and TensorBoard."""

  def __init__(
    self, workdir: str, enabled: bool = True, resume_step: int | None = None
  ):
    """Opens the writers.

    Args:
      workdir: output directory.
      enabled: False makes every call a no-op (non-zero processes).
      resume_step: when resuming, records after this step (written by the
        interrupted run past its last checkpoint) are dropped so the file
        holds each step once.
    """
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        keep = [ln for ln in f if _step_of(ln) <= resume_step]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, path)
    self._jsonl = open(path, "a")
    if EventFileWriter is not None:
      self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))
    else:
      logging.warning("tensorboard not installed: no event files written.")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Writes one record ``{"step": step, **metrics}``."""
    if not self.enabled:
      return
    rec = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      values = [
        Summary.Value(tag=k, simple_value=float(v))
        for k, v in rec.items()
        if k != "step" and isinstance(v, (int, float))
      ]
      self._tb.add_event(
        Event(
          wall_time=time.time(), step=int(step), summary=Summary(value=values)
        )
      )
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
