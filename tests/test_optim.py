"""Tests for vptpc.optim against an independent reading of the VPT recipe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vptpc import optim

BASE_LR = 0.1
BATCH = 128
STEPS_PER_EPOCH = 8
TOTAL = 100
WARMUP = 10


def _official_lr(epoch):
  """VPT's per-epoch warmup-cosine LR, written with python math only."""
  peak = BASE_LR * BATCH / 256
  if epoch < WARMUP:
    return peak * epoch / WARMUP
  progress = (epoch - WARMUP) / (TOTAL - WARMUP)
  return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _schedule(**overrides):
  kwargs = dict(
    base_lr=BASE_LR,
    batch_size=BATCH,
    steps_per_epoch=STEPS_PER_EPOCH,
    total_epochs=TOTAL,
    warmup_epochs=WARMUP,
  )
  kwargs.update(overrides)
  return optim.create_lr_schedule(**kwargs)


def test_schedule_matches_official_formula_per_epoch():
  schedule = _schedule()
  steps = list(range(0, TOTAL * STEPS_PER_EPOCH, 3)) + [
    TOTAL * STEPS_PER_EPOCH - 1
  ]
  got = [float(schedule(s)) for s in steps]
  want = [_official_lr(s // STEPS_PER_EPOCH) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_schedule_epoch_zero_is_exactly_zero():
  schedule = _schedule()
  for step in range(STEPS_PER_EPOCH):
    assert float(schedule(step)) == 0.0
  assert float(schedule(STEPS_PER_EPOCH)) > 0.0


def test_schedule_is_constant_within_an_epoch():
  schedule = _schedule()
  for epoch in (1, 5, 10, 37, 99):
    values = {
      float(schedule(epoch * STEPS_PER_EPOCH + i))
      for i in range(STEPS_PER_EPOCH)
    }
    assert len(values) == 1, (epoch, values)
  # Peak is reached at the first post-warmup epoch.
  np.testing.assert_allclose(
    float(schedule(WARMUP * STEPS_PER_EPOCH)), BASE_LR * BATCH / 256, rtol=1e-6
  )


def test_schedule_works_under_jit_with_int_steps():
  schedule = _schedule()
  steps = jnp.arange(TOTAL * STEPS_PER_EPOCH, dtype=jnp.int32)
  got = np.asarray(jax.jit(jax.vmap(schedule))(steps))
  want = [_official_lr(int(s) // STEPS_PER_EPOCH) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_per_step_schedule_varies_within_epoch():
  schedule = _schedule(per_step=True)
  peak = BASE_LR * BATCH / 256
  # Warmup is linear in the fractional epoch.
  for step in (0, 1, 3, 7, 8, 13):
    want = peak * (step / STEPS_PER_EPOCH) / WARMUP
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)
  within = [float(schedule(40 * STEPS_PER_EPOCH + i)) for i in range(8)]
  assert len(set(within)) == STEPS_PER_EPOCH
  assert np.all(np.diff(within) < 0)
  step = 40 * STEPS_PER_EPOCH + 5
  progress = (step / STEPS_PER_EPOCH - WARMUP) / (TOTAL - WARMUP)
  np.testing.assert_allclose(
    float(schedule(step)),
    peak * 0.5 * (1 + math.cos(math.pi * progress)),
    rtol=1e-5,
  )


def test_multiplier_values_and_zero_warmup():
  m = optim.vpt_lr_multiplier(jnp.arange(12), 10, 100)
  np.testing.assert_allclose(
    np.asarray(m)[:11], [e / 10 for e in range(10)] + [1.0], atol=1e-7
  )
  assert float(optim.vpt_lr_multiplier(0, 10, 100)) == 0.0
  # Without warmup the cosine starts at its peak on epoch 0.
  np.testing.assert_allclose(float(optim.vpt_lr_multiplier(0, 0, 50)), 1.0)
  np.testing.assert_allclose(
    float(optim.vpt_lr_multiplier(25, 0, 50)), 0.5, atol=1e-6
  )
  # Past the end the LR stays at zero rather than following the cosine up.
  np.testing.assert_allclose(
    np.asarray(optim.vpt_lr_multiplier(jnp.array([100, 150, 190]), 10, 100)),
    0.0,
    atol=1e-7,
  )


@pytest.mark.parametrize(
  "name, value",
  [
    ("steps_per_epoch", 0),
    ("steps_per_epoch", 2.5),
    ("batch_size", 0),
    ("base_lr", -1.0),
    ("base_lr", float("nan")),
    ("warmup_epochs", -1),
    ("total_epochs", 0),
    ("total_epochs", WARMUP),
  ],
)
def test_schedule_bad_arguments_raise(name, value):
  with pytest.raises(ValueError, match=name):
    _schedule(**{name: value})


def test_multiplier_bad_arguments_raise():
  with pytest.raises(ValueError, match="total_epochs"):
    optim.vpt_lr_multiplier(0, 10, 5)
  with pytest.raises(ValueError, match="warmup_epochs"):
    optim.vpt_lr_multiplier(0, -2, 5)


def test_optimizer_bad_arguments_raise():
  with pytest.raises(ValueError, match="weight_decay"):
    optim.create_optimizer(0.1, weight_decay=-1e-4)
  with pytest.raises(ValueError, match="momentum"):
    optim.create_optimizer(0.1, weight_decay=1e-4, momentum=-0.5)


def _small_tree(rng):
  return {
    "prompts": {
      "shallow": rng.normal(size=(1, 3, 4)).astype(np.float32),
      "deep": rng.normal(size=(2, 3, 4)).astype(np.float32),
    },
    "head": {
      "kernel": rng.normal(size=(4, 5)).astype(np.float32),
      "bias": rng.normal(size=(5,)).astype(np.float32),
    },
  }


def test_weight_decay_mask_excludes_only_head_bias():
  params = _small_tree(np.random.default_rng(0))
  mask = optim.weight_decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert mask["head"]["bias"] is False
  assert mask["head"]["kernel"] is True
  assert mask["prompts"]["shallow"] is True
  assert mask["prompts"]["deep"] is True
  # A "bias" outside the head still decays.
  assert optim.weight_decay_mask({"prompts": {"bias": np.zeros(2)}}) == {
    "prompts": {"bias": True}
  }


def test_optimizer_matches_numpy_torch_sgd():
  rng = np.random.default_rng(1)
  params = _small_tree(rng)
  momentum, wd = 0.9, 0.01
  # Peak 0.4 * 128 / 256 = 0.2; per-epoch multipliers 0, 0.5, 1, 0.5. Epoch 0
  # runs at LR 0 but must still fill the momentum buffer.
  schedule = optim.create_lr_schedule(
    base_lr=0.4,
    batch_size=128,
    steps_per_epoch=2,
    total_epochs=4,
    warmup_epochs=2,
  )
  lr_per_step = [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.1, 0.1]
  tx = optim.create_optimizer(schedule, weight_decay=wd, momentum=momentum)
  state = tx.init(params)
  jparams = params
  ref = jax.tree.map(np.array, params)
  flat_ref, treedef = jax.tree.flatten_with_path(ref)
  bufs = [None] * len(flat_ref)
  for lr in lr_per_step:
    grads = jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params
    )
    updates, state = tx.update(grads, state, jparams)
    jparams = optax.apply_updates(jparams, updates)
    # torch.optim.SGD(momentum, weight_decay, dampening=0, nesterov=False).
    flat_g = jax.tree.leaves(grads)
    new_flat = []
    for i, ((path, p), g) in enumerate(zip(flat_ref, flat_g, strict=True)):
      is_head_bias = [k.key for k in path] == ["head", "bias"]
      d = g.astype(np.float64) + (0.0 if is_head_bias else wd) * p
      bufs[i] = d if bufs[i] is None else momentum * bufs[i] + d
      new_flat.append((path, p - lr * bufs[i]))
    flat_ref = new_flat
  ref = jax.tree.unflatten(treedef, [p for _, p in flat_ref])
  for got, want in zip(
    jax.tree.leaves(jparams), jax.tree.leaves(ref), strict=True
  ):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # The decay really is masked: with zero grads only the bias stays put.
  zero = jax.tree.map(np.zeros_like, params)
  tx = optim.create_optimizer(0.1, weight_decay=0.5)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert np.all(np.asarray(updates["head"]["bias"]) == 0)
  np.testing.assert_allclose(
    np.asarray(updates["head"]["kernel"]),
    -0.1 * 0.5 * params["head"]["kernel"],
    rtol=1e-6,
  )


def test_prompt_lr_scale_scales_only_prompt_updates():
  params = {
    "prompts": {"encoderblock_0": jnp.ones((2, 3))},
    "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
  }
  grads = jax.tree_util.tree_map(jnp.ones_like, params)

  def update(scale):
    opt = optim.create_optimizer(0.5, weight_decay=0.0, prompt_lr_scale=scale)
    u, _ = opt.update(grads, opt.init(params), params)
    return u

  base, scaled = update(1.0), update(0.1)
  np.testing.assert_allclose(
    scaled["prompts"]["encoderblock_0"], 0.1 * base["prompts"]["encoderblock_0"]
  )
  np.testing.assert_allclose(scaled["head"]["kernel"], base["head"]["kernel"])
  np.testing.assert_allclose(base["head"]["kernel"], -0.5)
