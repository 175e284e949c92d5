"""Tests for vptpc.config_args.parse_arg and config_util's choice lists."""

import importlib

import ml_collections
import pytest

from vptpc import config_util
from vptpc.config_args import parse_arg

SPEC = dict(
  task="cifar100",
  num_prompts=10,
  smoke=False,
  lr=0.1,
  counts=(1, 2),
  ckpt=None,
)


def _parse(arg, **extra):
  return parse_arg(arg, **{**SPEC, **extra})


def test_example_from_docstring():
  cfg = _parse("task=dtd,num_prompts=50,smoke")
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert cfg.task == "dtd"
  assert cfg.num_prompts == 50 and type(cfg.num_prompts) is int
  assert cfg.smoke is True
  # Untouched keys keep their defaults.
  assert cfg.lr == 0.1
  assert cfg.counts == (1, 2)
  assert cfg.ckpt is None


@pytest.mark.parametrize("arg", [None, "", "   ", ","])
def test_empty_arg_returns_defaults(arg):
  assert _parse(arg).to_dict() == SPEC


def test_whitespace_is_stripped():
  cfg = _parse("  task = dtd ,  smoke , lr= 2.5 ,")
  assert cfg.task == "dtd"
  assert cfg.smoke is True
  assert cfg.lr == 2.5


def test_values_follow_default_types():
  cfg = _parse("num_prompts=-3,lr=1e-3,task=12,ckpt=/tmp/a=b.npz")
  assert cfg.num_prompts == -3 and type(cfg.num_prompts) is int
  assert cfg.lr == 1e-3 and type(cfg.lr) is float
  # A str key keeps a numeric-looking value as str.
  assert cfg.task == "12"
  # A None default accepts a str; only the first "=" splits key and value.
  assert cfg.ckpt == "/tmp/a=b.npz"
  # An int is accepted for a float key and converted.
  lr = _parse("lr=5").lr
  assert lr == 5.0 and type(lr) is float


@pytest.mark.parametrize(
  "text, want",
  [
    ("true", True),
    ("True", True),
    ("YES", True),
    ("1", True),
    ("false", False),
    ("FALSE", False),
    ("no", False),
    ("0", False),
  ],
)
def test_bool_literals(text, want):
  assert _parse(f"smoke={text}", smoke=not want).smoke is want


def test_bare_bool_key_is_true():
  assert _parse("smoke", smoke=False).smoke is True
  assert _parse("smoke", smoke=True).smoke is True


@pytest.mark.parametrize(
  "arg, key, value, expected",
  [
    ("num_prompts=1.5", "num_prompts", "1.5", "int"),
    ("num_prompts=ten", "num_prompts", "ten", "int"),
    ("num_prompts=", "num_prompts", "", "int"),
    ("lr=fast", "lr", "fast", "float"),
    ("smoke=maybe", "smoke", "maybe", "bool"),
    ("smoke=2", "smoke", "2", "bool"),
    ("counts=1:x:3", "counts", "1:x:3", "tuple of int"),
  ],
)
def test_bad_value_names_key_value_and_type(arg, key, value, expected):
  with pytest.raises(ValueError) as e:
    _parse(arg)
  msg = str(e.value)
  assert repr(key) in msg
  assert repr(value) in msg
  assert expected in msg


def test_unknown_key_names_it_and_lists_valid_keys():
  with pytest.raises(ValueError) as e:
    _parse("task=dtd,num_promts=50")
  msg = str(e.value)
  assert "'num_promts'" in msg
  for key in SPEC:
    assert key in msg


@pytest.mark.parametrize("arg", ["task", "num_prompts", "counts", "ckpt"])
def test_bare_key_rejected_for_non_bool(arg):
  with pytest.raises(ValueError, match=arg):
    _parse(arg)


def test_duplicate_key_is_an_error():
  with pytest.raises(ValueError, match="Duplicate.*'task'"):
    _parse("task=dtd,task=dtd")
  with pytest.raises(ValueError, match="Duplicate.*'smoke'"):
    _parse("smoke,smoke=false")


def test_empty_key_is_an_error():
  with pytest.raises(ValueError, match="Empty key"):
    _parse("=3")


def test_tuples_are_colon_separated_and_typed():
  assert _parse("counts=5:10:0").counts == (5, 10, 0)
  assert _parse("counts=7").counts == (7,)
  assert _parse("counts= 1 : 2 ").counts == (1, 2)
  assert _parse("counts=").counts == ()
  floats = parse_arg("w=0.5:2", w=(1.0,)).w
  assert floats == (0.5, 2.0) and all(type(x) is float for x in floats)
  flags = parse_arg("f=yes:0", f=(False,)).f
  assert flags == (True, False)
  # An empty default tuple means str elements.
  assert parse_arg("names=a:b", names=()).names == ("a", "b")
  assert parse_arg("names=1:2", names=()).names == ("1", "2")
  assert parse_arg("names=a:b", names=("x",)).names == ("a", "b")


def test_unsupported_default_type_is_rejected():
  with pytest.raises(TypeError, match="'bad'"):
    parse_arg("", bad=[1, 2])
  with pytest.raises(TypeError, match="'bad'"):
    parse_arg("", bad=({},))


def test_lazy_accepts_unknown_keys_with_inferred_types():
  cfg = parse_arg(
    "task=dtd,x=3,y=1.5,z=abc,flag,t=TRUE,n=nan", lazy=True, task="c"
  )
  assert cfg.task == "dtd"
  assert cfg.x == 3 and type(cfg.x) is int
  assert cfg.y == 1.5
  assert cfg.z == "abc"
  assert cfg.flag is True
  assert cfg.t is True
  assert cfg.n == "nan"
  # Known keys are still type-checked in lazy mode.
  with pytest.raises(ValueError, match="'num_prompts'"):
    parse_arg("num_prompts=x", lazy=True, num_prompts=1)


# Each choice list of `config_util` is the constant of the module that acts
# on it, so the two cannot drift apart.
OWNERS = {
  "prompt.variant": ("vptpc.prompts", "VARIANTS"),
  "prompt.init": ("vptpc.prompts", "INITS"),
  "model.prelogit_norm": ("vptpc.build", "PRELOGIT_NORMS"),
  "data.normalize": ("vptpc.data.preprocessing", "NORMALIZATIONS"),
  "data.source": ("vptpc.data.sources", "SOURCES"),
  "data.preprocess": ("vptpc.data.preprocessing", "PREPROCESS"),
  "data.interpolation": ("vptpc.data.preprocessing", "INTERPOLATIONS"),
  "data.on_device": ("vptpc.data.device", "ON_DEVICE"),
  "data.verify_images": ("vptpc.data.sources", "VERIFY_IMAGES"),
  "parallel": ("vptpc.parallel", "MODES"),
  "protocol.mode": ("vptpc.protocol_runs", "MODES"),
  "condense.score_fn": ("vptpc.condense", "SCORE_FNS"),
  "condense.aggregation": ("vptpc.condense", "AGGREGATIONS"),
  "condense.scope": ("vptpc.condense", "SCOPES"),
  "condense.reproject": ("vptpc.condense", "REPROJECTIONS"),
}
# `vptpc.build` imports config_util, which therefore repeats build's lists.
REPEATED = {"model.prelogit_norm"}
# Not one owner's constant: "" (per backend) and `vptpc.models.levers`'
# implementations; JAX's names of the dtypes.
NOT_OWNED = {"model.attention_impl", "model.dtype"}


@pytest.mark.parametrize("key", sorted(OWNERS))
def test_choices_are_the_owners_constant(key):
  module, name = OWNERS[key]
  owned = getattr(importlib.import_module(module), name)
  choices = config_util._CHOICES[key]
  if key in REPEATED:
    assert choices == owned, f"config_util repeats {module}.{name}: update it"
  else:
    assert choices is owned, f"config_util._CHOICES[{key!r}]: use {name}"


def test_every_choice_list_has_an_owner():
  unowned = set(config_util._CHOICES) - set(OWNERS) - NOT_OWNED
  assert not unowned, f"add a row to OWNERS for {sorted(unowned)}"


def test_head_init_choices_are_builds():
  from vptpc import build

  assert config_util._HEAD_INITS == build.HEAD_INITS


def test_dtype_choices_are_jax_float_dtypes():
  import jax.numpy as jnp

  for name in config_util._CHOICES["model.dtype"]:
    assert jnp.issubdtype(jnp.dtype(name), jnp.floating), name


def test_moved_parse_arg_still_answers_with_a_warning():
  with pytest.warns(DeprecationWarning, match="config_args.parse_arg"):
    moved = config_util.parse_arg
  assert moved is parse_arg
