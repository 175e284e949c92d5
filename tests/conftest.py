"""Shared fixtures: a tiny ViT (width 32, 32 px) and its parameters."""

import jax
import pytest

from vptpc.models import vit

# Eight CPU devices for the pmap tests (style.md §8); must precede any use
# of the backend. Single-device code still runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

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
