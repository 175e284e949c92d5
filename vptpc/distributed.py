"""Multi-process runs (TPU pods, multi-GPU nodes) through ``jax.distributed``.

vptpc grows no launcher of its own: start the same command on every host
(``gcloud ... ssh --worker=all``, ``srun``) with ``--distributed`` (or
``VPTPC_DISTRIBUTED=1``) and `initialize` calls
``jax.distributed.initialize()`` before any device is touched. On Cloud TPU
and under SLURM JAX finds the coordinator, process count and index itself;
elsewhere give them as JAX does (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or vptpc's equivalents below.

What the rest of vptpc does in a multi-process run: the pmapped train step
runs on each process's local devices and its ``psum`` spans every device;
every process draws the same global batches and keeps its contiguous share
(`vptpc.parallel.process_slice`), so the global batch and the result do not
depend on the process count; evaluation sums over all processes, each
example counted once; Orbax checkpoints are saved and restored by all
processes (on a filesystem they share); only process 0 writes metrics,
tables and exports.

For a test on one machine, ``VPTPC_CPU_DEVICES=n`` gives each process n CPU
devices and gloo collectives.
"""

from __future__ import annotations

import os

import jax


def requested() -> bool:
  """Whether ``VPTPC_DISTRIBUTED`` asks for a multi-process run."""
  return os.environ.get("VPTPC_DISTRIBUTED", "") not in ("", "0", "false")


def initialize(timeout_s: int = 300) -> None:
  """Starts JAX's multi-process runtime; call before any device use.

  Reads, when set, ``VPTPC_COORDINATOR`` (host:port), ``VPTPC_NUM_PROCESSES``
  and ``VPTPC_PROCESS_ID`` (else JAX's own variables / cluster detection),
  and ``VPTPC_CPU_DEVICES`` (CPU devices per process, with gloo collectives:
  the one-machine test setup).
  """
  cpu = int(os.environ.get("VPTPC_CPU_DEVICES", "0") or 0)
  if cpu:
    jax.config.update("jax_num_cpu_devices", cpu)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if os.environ.get("VPTPC_COORDINATOR"):
    kw = dict(
      coordinator_address=os.environ["VPTPC_COORDINATOR"],
      num_processes=int(os.environ["VPTPC_NUM_PROCESSES"]),
      process_id=int(os.environ["VPTPC_PROCESS_ID"]),
    )
  jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
