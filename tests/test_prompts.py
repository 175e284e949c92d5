"""Tests for the prompt pytree utilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vptpc import prompts as pr
from vptpc.models import vit


def deep(counts=5, layers=3, seed=0):
  return pr.init_prompts(
    jax.random.key(seed),
    num_prompts=counts,
    hidden_size=32,
    patch_size=8,
    num_layers=layers,
  )


def test_init_bound_matches_official_value():
  # sqrt(6/1536) (docs/references.md, "VPT: prompt initialisation").
  assert pr.init_bound(16, 768) == 0.0625


def test_init_is_uniform_within_bound():
  p = pr.init_prompts(
    jax.random.key(0),
    num_prompts=200,
    hidden_size=768,
    patch_size=16,
    num_layers=2,
  )
  v = np.concatenate([np.asarray(x).ravel() for x in p.values()])
  assert np.abs(v).max() <= 0.0625
  # Uniform(-b, b) has std b / sqrt(3); a normal init would be far off.
  assert abs(v.std() - 0.0625 / np.sqrt(3)) < 1e-3
  assert abs(v.mean()) < 1e-3
  # Layers get independent draws.
  assert not np.allclose(p["encoderblock_0"], p["encoderblock_1"])


def test_count_deep_and_shallow():
  c = pr.count_prompts(deep((3, 0, 4)))
  assert c["variant"] == "deep"
  assert c["per_layer"] == {
    "encoderblock_0": 3,
    "encoderblock_1": 0,
    "encoderblock_2": 4,
  }
  assert c["tokens"] == 7 and c["params"] == 7 * 32
  s = pr.init_prompts(
    jax.random.key(0),
    num_prompts=10,
    hidden_size=32,
    patch_size=8,
    variant="shallow",
  )
  assert pr.count_prompts(s)["tokens"] == 10
  assert pr.prompts_per_layer(s) == (10,)


def test_layer_order_is_numeric():
  p = deep(1, layers=12)
  assert pr.layer_keys(p)[-3:] == [
    "encoderblock_9",
    "encoderblock_10",
    "encoderblock_11",
  ]


def test_vit_b16_with_100_deep_prompts_counts():
  # The tuned-parameter count of the official dmlab run
  # (docs/references.md, "VPT: per-task prompt counts").
  p = jax.eval_shape(
    lambda k: pr.init_prompts(
      k, num_prompts=100, hidden_size=768, patch_size=16, num_layers=12
    ),
    jax.random.key(0),
  )
  head = {"kernel": np.zeros((768, 6)), "bias": np.zeros(6)}
  c = pr.count_prompts(p)
  assert c["tokens"] == 1200 and c["params"] == 921_600
  assert "trainable total:   926,214" in pr.summary(p, head)


def test_gather_ragged_values_and_order():
  p = deep(5)
  g = pr.gather_prompts(
    p,
    {"encoderblock_0": [4, 1], "encoderblock_1": [], "encoderblock_2": [0]},
  )
  assert pr.prompts_per_layer(g) == (2, 0, 1)
  np.testing.assert_array_equal(g["encoderblock_0"][0], p["encoderblock_0"][4])
  np.testing.assert_array_equal(g["encoderblock_0"][1], p["encoderblock_0"][1])
  np.testing.assert_array_equal(g["encoderblock_2"][0], p["encoderblock_2"][0])


def test_gather_inside_jit_with_static_indices():
  p = deep(5)
  keep = [np.array([0, 2]), np.array([], int), np.array([1, 3, 4])]
  g = jax.jit(lambda t: pr.gather_prompts(t, keep))(p)
  assert pr.prompts_per_layer(g) == (2, 0, 3)


@pytest.mark.parametrize(
  "keep,match",
  [
    ([[0], [1]], "2 index lists"),
    ([[0], [5], [1]], "encoderblock_1.*outside"),
    ([[0, 0], [1], [1]], "encoderblock_0.*repeats"),
    ({"encoderblock_0": [0], "encoderblock_1": [0]}, "encoderblock_2"),
  ],
)
def test_gather_rejects_bad_indices(keep, match):
  with pytest.raises(ValueError, match=match):
    pr.gather_prompts(deep(5), keep)


def test_init_rejects_bad_counts():
  with pytest.raises(ValueError, match="num_prompts"):
    deep((1, 2))
  with pytest.raises(ValueError, match="num_layers"):
    pr.init_prompts(
      jax.random.key(0), num_prompts=1, hidden_size=8, patch_size=4
    )


def test_save_load_round_trip_and_backbone_checks(tmp_path, tiny_params):
  backbone, head = vit.split_head(tiny_params)
  p = pr.gather_prompts(deep(4), [[0, 1], [], [3]])
  path = tmp_path / "task.npz"
  pr.save_prompts(path, p, head, backbone=backbone, metadata={"task": "dtd"})
  # A small standalone file: prompts + head only, no backbone.
  assert path.stat().st_size < 20_000
  p2, h2, meta = pr.load_prompts(path, backbone=backbone)
  assert meta["metadata"] == {"task": "dtd"}
  assert meta["prompts_per_layer"] == [2, 0, 1]
  for k in p:
    np.testing.assert_array_equal(p2[k], p[k])
  np.testing.assert_array_equal(h2["kernel"], head["kernel"])

  # Different weights of the same shape: refused unless asked for.
  other = jax.tree_util.tree_map(lambda a: a + 1.0, backbone)
  with pytest.raises(pr.PromptFileError, match="task.npz.*fingerprint"):
    pr.load_prompts(path, backbone=other)
  pr.load_prompts(path, backbone=other, check_fingerprint=False)

  # A backbone of another width or depth is always refused.
  wide = vit.init_params(
    vit.VisionTransformer(
      patch_size=8, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=16
    ),
    jax.random.key(0),
    32,
  )
  with pytest.raises(pr.PromptFileError, match="width.*layers"):
    pr.load_prompts(path, backbone=wide, check_fingerprint=False)


def test_save_prompts_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "p.npz"
  pr.save_prompts(path, deep(2))
  before = path.read_bytes()
  with pytest.raises(TypeError):
    pr.save_prompts(path, deep(2), metadata={"bad": object()})
  assert path.read_bytes() == before
  assert [f.name for f in tmp_path.iterdir()] == ["p.npz"]


def test_load_prompts_errors_name_the_file(tmp_path):
  with pytest.raises(pr.PromptFileError, match="missing.npz"):
    pr.load_prompts(tmp_path / "missing.npz")
  np.savez(tmp_path / "plain.npz", a=np.zeros(2))
  with pytest.raises(pr.PromptFileError, match="plain.npz.*not a vptpc"):
    pr.load_prompts(tmp_path / "plain.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(pr.PromptFileError, match="junk.npz"):
    pr.load_prompts(tmp_path / "junk.npz")


def test_summary_lists_layers_and_totals():
  head = {"kernel": jnp.zeros((32, 3)), "bias": jnp.zeros(3)}
  s = pr.summary(deep((2, 0, 1)), head)
  assert "encoderblock_1      0" in s
  assert "total               3 tokens" in s
  assert "prompt parameters: 96" in s
  assert "trainable total:   195" in s


def test_mixed_tree_is_rejected():
  with pytest.raises(ValueError, match="either"):
    pr.count_prompts(
      {"input": jnp.zeros((1, 4)), "encoderblock_0": jnp.zeros((1, 4))}
    )


def test_init_from_tokens_draws_distinct_rows_of_each_pool():
  pools = {
    f"encoderblock_{i}": jnp.arange(20 * 4, dtype=jnp.float32).reshape(20, 4)
    + 1000 * i
    for i in range(3)
  }
  p = pr.init_prompts_from_tokens(
    jax.random.key(0), pools, num_prompts=(5, 0, 2)
  )
  assert pr.prompts_per_layer(p) == (5, 0, 2)
  for k, v in p.items():
    rows = {tuple(r) for r in np.asarray(pools[k]).tolist()}
    got = [tuple(r) for r in np.asarray(v).tolist()]
    assert set(got) <= rows and len(set(got)) == len(got)
  again = pr.init_prompts_from_tokens(
    jax.random.key(0), pools, num_prompts=(5, 0, 2)
  )
  for k in p:
    np.testing.assert_array_equal(p[k], again[k])
  shallow = pr.init_prompts_from_tokens(
    jax.random.key(0), {"input": pools["encoderblock_0"]}, num_prompts=3,
    variant="shallow",
  )  # fmt: skip
  assert shallow["input"].shape == (3, 4)
  with pytest.raises(ValueError, match="encoderblock_0.*only 20"):
    pr.init_prompts_from_tokens(jax.random.key(0), pools, num_prompts=21)
