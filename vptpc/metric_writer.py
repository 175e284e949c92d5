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


class MetricWriter:
  """Appends scalar metrics to ``<workdir>/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    """Opens the writers (``enabled=False`` makes every call a no-op)."""
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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
