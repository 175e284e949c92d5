"""Command line: ``python -m vptpc.main --config=configs/x.py --workdir=DIR``.

Kept thin on purpose (as the flax examples): flags, device logging, then
`vptpc.protocol.run` (one run, or VPT's tune / final protocol, by
``config.protocol.mode``), which notebooks and tests call directly.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses flags, turning ml_collections' tracebacks into one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # Errors raised inside get_config() arrive with a whole traceback; the
    # last line is the message that names the key.
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [repr(e)]
    msg = lines[0]
    if len(lines) > 1:
      msg = f"{lines[0].split(':')[0]}: {lines[-1]}"
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:
    # An unknown --config.<key> surfaces as a raw KeyError/AttributeError.
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, KeyError) else str(inner)
    text = str(text).replace("\n", "; ")
    print(
      f"error: unknown config key in {' '.join(bad)}: {text}",
      file=sys.stderr,
    )
    sys.exit(2)


class _QuietOrbax:
  """Drops Orbax's per-save INFO chatter from the terminal (kept: warnings)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  """Runs training and evaluation for the parsed config."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # Keep TensorFlow (if TFDS pulls it in) off the accelerators JAX uses.
  try:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  import jax

  from vptpc import distributed

  if _DISTRIBUTED.value or distributed.requested():
    distributed.initialize()  # before any device is touched
  elif os.environ.get("VPTPC_CPU_DEVICES"):
    jax.config.update(
      "jax_num_cpu_devices", int(os.environ["VPTPC_CPU_DEVICES"])
    )

  from vptpc import protocol
  from vptpc.checkpoint import CheckpointError
  from vptpc.config_util import ConfigError
  from vptpc.data.pipeline import DataError
  from vptpc.prompts import PromptFileError

  logging.info(
    "Process %d of %d; devices: %s local, %s global",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  try:
    protocol.run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, CheckpointError, PromptFileError) as e:
    # Input errors get their message, not a traceback; the workdir's
    # checkpoints are untouched by them.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
