"""Backbone families as plugins: a new family is one module and one line.

The module below is docs/backbones.md's example family: it reuses every
ViT hook and owns one name of its own.
"""

import sys
import types

import jax
import jax.numpy as jnp
import pytest

from vptpc import config_util, flops
from vptpc.models import registry, swin_family, vit_family

HOOKS = (
  "NAME",
  "DISPLAY",
  "ALIASES",
  "STANDARD_CHECKPOINTS",
  "CHECKPOINT_FIX",
  "READS_NPZ",
  "EXPORTABLE",
  "GLOBAL_ATTENTION",
  "SMOKE_MODEL",
  "FILE_KINDS",
  "EXTRA_FILE_KEYS",
  "knows",
  "model_names",
  "pretrained",
  "create_model",
  "owns",
  "owns_tree",
  "file_kind",
  "file_dims",
  "adapt_file",
  "checkpoint_sources",
  "model_problems",
  "image_size_problems",
  "feature_width",
  "num_prefix",
  "init_prompts",
  "final_norm_path",
  "cast_backbone",
  "build_kv_cache",
  "intermediates",
  "backbone_meta",
  "gmacs",
)


@pytest.mark.parametrize("fam", [vit_family, swin_family])
def test_every_family_defines_every_hook(fam):
  missing = [h for h in HOOKS if not hasattr(fam, h)]
  assert not missing
  assert registry.family(fam.NAME) is fam


@pytest.fixture
def tiny_family(monkeypatch):
  mod = types.ModuleType("tiny_family")
  mod.__dict__.update(
    {k: v for k, v in vars(vit_family).items() if not k.startswith("__")}
  )
  mod.NAME, mod.DISPLAY = "tiny", "TinyViT"
  mod.knows = lambda name: name == "my-tiny"
  mod.model_names = lambda: ("my-tiny",)
  mod.create_model = lambda name, **f: vit_family.vit.create_model(
    "tiny32", **f
  )
  monkeypatch.setitem(sys.modules, "tiny_family", mod)
  monkeypatch.setitem(registry.FAMILIES, "tiny", "tiny_family")
  return mod


def test_a_new_family_is_one_module_and_one_line(tiny_family):
  assert registry.model_family("my-tiny") == "tiny"
  assert registry.model_rows()["my-tiny"] == "tiny"
  model = registry.create_model("my-tiny", num_classes=3, kv_only=True)
  c = config_util.base_config()
  c.model.name, c.data.image_size = "my-tiny", 32
  assert config_util.problems(c) == []
  params = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )["params"]
  assert registry.final_norm_path(params) == ("Transformer", "encoder_norm")
  assert flops.model_gmacs(model, 32, 2) > flops.model_gmacs(model, 32, 0)
  with pytest.raises(ValueError, match="tiny: my-tiny"):
    registry.model_family("not-a-model")
