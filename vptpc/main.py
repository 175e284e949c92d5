"""Command line: ``python -m vptpc.main --config=configs/x.py --workdir=DIR``.

Kept thin on purpose (as the flax examples): flags, device logging, then
`vptpc.protocol.run` (one run, or VPT's tune / final protocol, by
``config.protocol.mode``), which notebooks and tests call directly.

Every error a user can cause (a config, workdir, checkpoint, prompts file
or data problem, a workdir another run holds, a non-finite loss, a full
disk) ends in ``error:`` lines on stderr and exit status 2, without a
traceback; unmet preconditions are all listed at once, before anything is
written (`vptpc.preflight`). Ctrl-C (SIGINT) and SIGTERM stop a run
cleanly, with a checkpoint where one can be written, one line saying where
it stopped, and exit status 130 or 143 (`vptpc.stops`).
"""

from __future__ import annotations

import glob
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vptpc import stops

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, optionally with an argument: path.py:arg.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint dir.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-process run: jax.distributed.initialize() first (also "
  "VPTPC_DISTRIBUTED=1); see vptpc.distributed.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _config_file_error(argv: list[str]) -> str | None:
  """Names a ``--config`` file that does not exist (before it is loaded)."""
  for i, a in enumerate(argv[1:], 1):
    if a == "--config" and i + 1 < len(argv):
      a = "--config=" + argv[i + 1]
    if a.startswith("--config="):
      path = a.split("=", 1)[1].partition(":")[0]
      if path and not os.path.isfile(path):
        here = os.path.join(os.path.dirname(path) or ".", "*.py")
        have = sorted(glob.glob(here))[:8]
        return (
          f"config file {path!r} does not exist (--config={path}); "
          + (
            f"files there: {', '.join(have)}"
            if have
            else "pass a config .py file, e.g. --config=configs/tiny.py"
          )
          + "."
        )
  return None


def _fail(lines: list[str] | str) -> None:
  """Prints one ``error:`` line per problem and exits with status 2."""
  # JAX and the library are imported only once the flags parse (here and in
  # `main`): a mistyped flag or config file is reported in a fraction of a
  # second, and jax.distributed starts before any device is touched.
  from vptpc.preflight import exit_with

  exit_with(lines)


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses flags, turning ml_collections' tracebacks into one clear line."""
  missing = _config_file_error(argv)
  if missing:
    _fail(missing)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # Errors raised inside get_config() arrive with a whole traceback; the
    # last line is the message that names the key.
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [repr(e)]
    msg = lines[0]
    if len(lines) > 1:
      msg = f"{lines[0].split(':')[0]}: {lines[-1]}"
    _fail(msg)
  except (KeyError, AttributeError) as e:
    # An unknown --config.<key> surfaces as a raw KeyError/AttributeError.
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, KeyError) else str(inner)
    text = str(text).replace("\n", "; ")
    # Name the override that holds the unknown key, not every override.
    named = [
      a
      for a in bad
      if any(f".{q}" in a.split("=", 1)[0] + "." for q in text.split("'")[1::2])
    ]
    _fail(f"unknown config key in {' '.join(named or bad)}: {text}")


class _Quiet:
  """Drops start-up and library chatter that tells a user nothing.

  Dropped: Orbax's per-save INFO lines; TFDS's INFO lines (vptpc names the
  data directory itself) and its "OpenCV is not installed" advice (PIL
  decodes the same images); JAX's INFO line about a TPU backend it probed
  for and did not find on a CPU or GPU machine; Orbax's traceback of a
  failed checkpoint write, which vptpc reports as one line. Every other
  warning and error is kept.
  """

  def filter(self, record) -> bool:
    path = record.pathname.replace(os.sep, "/")
    if "orbax" in path:
      exc = record.exc_info[1] if record.exc_info else None
      return record.levelno >= 30 and not isinstance(exc, OSError)
    if "tensorflow_datasets" in path:
      return record.levelno >= 30 and "OpenCV" not in record.getMessage()
    if path.endswith("xla_bridge.py") and record.levelno < 30:
      return "Unable to initialize backend" not in record.getMessage()
    return True


def main(argv: list[str]) -> None:
  """Runs training and evaluation for the parsed config."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    with stops.handling():
      _main()
  except stops.Stopped as e:
    # One line and the shell's status for the signal (130 SIGINT, 143
    # SIGTERM); the checkpoint, if one was due, is already written.
    print(e.line(), file=sys.stderr, flush=True)
    sys.exit(e.exit_status)


def _main() -> None:
  """`main` inside the signal handlers: config, devices, the run."""
  quiet = _Quiet()
  logging.get_absl_handler().addFilter(quiet)
  # Orbax's thread errors reach Python's root handlers as well.
  for h in std_logging.getLogger().handlers:
    h.addFilter(quiet)
  try:
    config = _CONFIG.value
  except (OSError, ValueError, flags.Error) as e:
    _fail(f"--config: {str(e).strip().splitlines()[-1]}")
  # Keep TensorFlow (optional; TFDS may pull it in) off the accelerators JAX
  # uses.
  try:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  # Deferred (see `_fail`): JAX and the library, after the flags.
  import jax

  from vptpc import distributed

  if _DISTRIBUTED.value or distributed.requested():
    distributed.initialize()  # before any device is touched
  elif os.environ.get("VPTPC_CPU_DEVICES"):
    jax.config.update(
      "jax_num_cpu_devices", int(os.environ["VPTPC_CPU_DEVICES"])
    )

  from vptpc import protocol
  from vptpc.config_util import ConfigError
  from vptpc.data.sources import DataError
  from vptpc.npz_checkpoint import CheckpointError
  from vptpc.preflight import PreflightError
  from vptpc.prompts import PromptFileError
  from vptpc.rundir import WorkdirLocked

  logging.info(
    "Process %d of %d; devices: %s local, %s global",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  try:
    protocol.run(config, _WORKDIR.value)
  except PreflightError as e:
    # Every unmet precondition, one line each; nothing was written.
    _fail(e.problems)
  except (
    ConfigError,
    DataError,
    CheckpointError,
    PromptFileError,
    WorkdirLocked,
    FloatingPointError,
    OSError,
  ) as e:
    # Input errors and faults a user can act on get their message, not a
    # traceback: a config file, workdir or checkpoint problem, a held lock,
    # a non-finite loss, a full disk. Checkpoints are left as they were.
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
