"""Shared fixtures: a tiny ViT (width 32, 32 px) and its parameters."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

from vptpc.models import vit

# Eight CPU devices for the pmap tests (docs/references.md, "Platform
# notes"); must precede any use of the backend. Single-device code still runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache per test session, shared with the
# subprocesses the tests start (CLI runs, notebook kernels, suite workers)
# through the environment: many tests compile the same small programs, and
# a cache hit (keyed on the program, options and backend) skips XLA. A
# ViT-Ti/4 gradient took 4.6 s to compile and 1.2 s from the cache.
_CACHE = tempfile.mkdtemp(prefix="vptpc-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for _k, _v in (
  ("jax_compilation_cache_dir", _CACHE),
  ("jax_persistent_cache_min_compile_time_secs", 0),
  ("jax_persistent_cache_min_entry_size_bytes", -1),
):
  jax.config.update(_k, _v)
  os.environ[_k.upper()] = str(_v)

TINY = dict(patch_size=8, hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64)
IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def tiny_params():
  """Random backbone + 5-class head params of the tiny ViT at 32 px."""
  model = vit.VisionTransformer(**TINY, num_classes=5)
  return vit.init_params(model, jax.random.key(0), IMAGE_SIZE)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data_dir per test session (datasets are generated once)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA without most optimisations, for a module of compile-bound tests.

  Compiles dominate tests of many small programs; XLA's optimisations
  roughly double them and change nothing the tests compare (both sides of
  every comparison run under the same flag). Use it with
  ``pytestmark = pytest.mark.usefixtures("fast_compiles")``.
  """
  # The flag is not part of jit's in-memory cache key (it is of the
  # persistent cache's): without clearing, a program compiled inside the
  # module (unoptimised) would be reused after it by an in-process run whose
  # CLI twin compiles it optimised, and the two differ in the last bits
  # (test_faults' bit-identical resumes failed after test_swin so).
  old = jax.config.read("jax_disable_most_optimizations")
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
  jax.clear_caches()
