"""What a run prints: its progress while training and its results table.

On a terminal the progress is tqdm's bar; in a log or a pipe, where a
redrawing bar is one unreadable line, it is `ProgressLines`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


def bar(total: int, initial: int) -> Any:
  """A progress bar for steps ``initial..total``: tqdm's, or `ProgressLines`."""
  if interactive():
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
  return ProgressLines(total, initial)


def interactive() -> bool:
  """Whether a progress bar can redraw: stdout and stderr are terminals."""
  return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressLines:
  """The progress bar's stand-in for logs and pipes: a line now and then.

  A redrawing bar written to a file is one unreadable line of carriage
  returns; this prints ``step 130/1300 (10%) loss ... lr ... img/s ... eta
  ...`` to stderr at every tenth of the run (and at most every 30 s, at
  least every 5 min), and at the last step. Same interface as the tqdm
  calls `_train_loop` makes.
  """

  def __init__(self, total: int, initial: int = 0, out=None):
    """Starts counting at ``initial`` of ``total`` steps."""
    self.total, self.n = total, initial
    self.out = out or sys.stderr
    self.postfix: dict[str, str] = {}
    self._t0 = self._last_t = time.perf_counter()
    self._n1, self._last_t0 = initial, self._t0
    self._last_tenth = initial * 10 // max(total, 1)

  def set_postfix(self, **kw) -> None:
    """Remembers the latest metrics for the next line."""
    self.postfix = {k: str(v) for k, v in kw.items()}

  def update(self, n: int) -> None:
    """Advances ``n`` steps; prints a line when one is due."""
    self.n += n
    now = time.perf_counter()
    tenth = self.n * 10 // max(self.total, 1)
    due = (tenth > self._last_tenth and now - self._last_t >= 30) or (
      now - self._last_t >= 300
    )
    if self.n >= self.total or due or self._last_t == self._t0:
      self._line(now)
      self._last_tenth, self._last_t = tenth, now

  def _line(self, now: float) -> None:
    parts = [
      f"step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
    ]
    parts += [f"{k} {v}" for k, v in self.postfix.items()]
    if self._last_t != self._t0 and self.n < self.total:
      # From the second line on: the first update holds the compile.
      rate = (self.n - self._n1) / max(now - self._last_t0, 1e-9)
      parts.append(f"eta {(self.total - self.n) / max(rate, 1e-9):.0f}s")
    else:
      self._n1, self._last_t0 = self.n, now
    print(" ".join(parts), file=self.out, flush=True)

  def close(self) -> None:
    """Nothing to tear down (tqdm's interface)."""


def print_table(results: dict[str, Any]) -> None:
  """Prints a finished training run's results as a two-column table."""
  rows = [
    ("step", results["step"]),
    ("epochs", f"{results['epochs']:.2f}"),
    ("eval split", results["eval_split"]),
    ("eval examples", results["eval_examples"]),
    ("eval top-1", f"{100 * results['eval_accuracy']:.2f}%"),
    ("eval loss", f"{results['eval_loss']:.4f}"),
    ("prompts/layer", ",".join(map(str, results["prompts_per_layer"]))),
    ("trainable params", f"{results['trainable_params']:,}"),
    ("export", results["export"]),
  ]
  w = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), flush=True)


def print_condense_table(r: dict[str, Any]) -> None:
  """Prints a PC run's full and condensed results side by side."""
  f, c = r["full"], r["condensed"]
  rows = [
    ("", "full", "condensed"),
    (
      "eval top-1",
      f"{100 * f['eval_accuracy']:.2f}%",
      f"{100 * c['eval_accuracy']:.2f}%",
    ),
    ("prompts", str(f["prompts_total"]), str(c["prompts_total"])),
    (
      "prompts/layer",
      ",".join(map(str, f["prompts_per_layer"])),
      ",".join(map(str, c["prompts_per_layer"])),
    ),
    ("GFLOPs naive", f"{f['gflops_naive']:.4f}", f"{c['gflops_naive']:.4f}"),
    ("GFLOPs K/V", f"{f['gflops_kv']:.4f}", f"{c['gflops_kv']:.4f}"),
    (
      "eval img/s",
      f"{f['eval_img_per_s']:.1f}",
      f"{c['eval_img_per_s']:.1f}",
    ),
  ]
  w0 = max(len(x[0]) for x in rows)
  w1 = max(len(x[1]) for x in rows)
  print(
    "\n".join(f"{a:<{w0}}  {b:>{w1}}  {cc}" for a, b, cc in rows), flush=True
  )
