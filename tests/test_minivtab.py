"""Tests for the mini-VTAB suite, fractal generator and embedded backbone."""

import importlib.util
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vptpc import assets, checkpoint, npz_checkpoint
from vptpc.data import fractals, minivtab, pipeline, sources
from vptpc.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(minivtab.TASKS))
def test_builder_splits_and_labels(name, data_dir):
  task = minivtab.TASKS[name]
  sizes = {"train800": 800, "val200": 200, "train800val200": 1000}
  sizes["test"] = task.test_size
  assert task.test_size >= 500
  for split, n in sizes.items():
    src = sources.open_source(task.tfds_name, minivtab.SPLITS[split], data_dir)
    assert len(src) == n, (name, split)
  s = pipeline.load_split(
    task.tfds_name,
    minivtab.SPLITS["train800val200"],
    image_size=32,
    data_dir=data_dir,
    num_classes=task.num_classes,
  )
  assert s.images.shape == (1000, 32, 32, 3) and s.images.dtype == np.uint8
  assert s.labels.min() >= 0 and s.labels.max() < task.num_classes
  # Every class occurs in the training data.
  assert len(np.unique(s.labels)) == task.num_classes


@pytest.mark.parametrize(
  "builder,seed",
  [
    (minivtab.VptpcDspritesLoc, 10),
    (minivtab.VptpcDspritesOri, 11),
    (minivtab.VptpcCount, 20),
  ],
)
def test_generators_are_deterministic(builder, seed, tmp_path):
  b = builder(data_dir=str(tmp_path), file_format="array_record")

  def first(s):
    return [ex for _, ex in itertools.islice(b._generate_examples(s, 6), 6)]

  a, again, other = first(seed), first(seed), first(seed + 100)
  assert [x["image"] for x in a] == [x["image"] for x in again]
  assert [x["label"] for x in a] == [x["label"] for x in again]
  assert [x["image"] for x in a] != [x["image"] for x in other]


def test_vtab_label_definitions():
  lat = np.array(
    [[0, 0, 0, 0, 0], [1, 2, 39, 31, 5], [2, 5, 2, 2, 9], [0, 1, 3, 3, 1]]
  )
  # x position: 32 values // 2 -> 16 bins.
  assert minivtab.dsprites_label(lat, "x").tolist() == [0, 15, 1, 1]
  # orientation: 40 values -> 16 bins, floor(o * 16 / 40).
  assert minivtab.dsprites_label(lat, "orientation").tolist() == [0, 15, 0, 1]
  with pytest.raises(ValueError, match="attribute"):
    minivtab.dsprites_label(lat, "scale")


def test_count_scene_has_the_requested_objects():
  rng = np.random.default_rng(0)
  img = minivtab.render_count_scene(rng, 10)
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8

  # Objects are saturated colours on a grey floor: more colourful pixels
  # with more objects.
  def colourful(im):
    return (im.max(-1).astype(int) - im.min(-1) > 60).mean()

  few = minivtab.render_count_scene(np.random.default_rng(1), 3)
  assert colourful(img) > colourful(few)


def test_digits_are_sklearns():
  images, labels = minivtab.digits_arrays()
  assert images.shape == (1797, 8, 8, 1) and labels.max() == 9


def test_fractal_codes_are_deterministic_and_contractive():
  a = fractals.make_class_codes(8, seed=3)
  b = fractals.make_class_codes(8, seed=3)
  np.testing.assert_array_equal(a, b)
  for code in a:
    used = code[code[:, 6] > 0]
    assert 2 <= len(used) <= 4
    np.testing.assert_allclose(used[:, 6].sum(), 1.0)
    for m in used:
      assert np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False)[0] < 1
  imgs, labels, aux = fractals.make_dataset(a, 3, seed=1)
  assert imgs.shape == (24, 32, 32, 3) and sorted(set(labels)) == list(range(8))
  pos = aux["position"]
  assert pos.min() >= 0 and pos.max() < fractals.POSITION_GRID**2
  again = fractals.make_dataset(a, 3, seed=1)
  np.testing.assert_array_equal(imgs, again[0])


def test_shipped_backbone_loads_through_the_npz_loader():
  model = vit.create_model(assets.DEFAULT_MODEL, num_classes=7)
  template = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )["params"]
  backbone, _ = vit.split_head(template)
  params = checkpoint.load_pretrained(assets.path(), backbone)
  assert params["embedding"]["kernel"].shape == (4, 4, 3, 128)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (
    1,
    65,
    128,
  )
  assert vit.count_params(params) == vit.count_params(backbone)
  assert os.path.getsize(assets.path()) < 20 * 2**20
  # The file is in Google's layout, head included (1,000 fractal classes).
  flat = npz_checkpoint.read_npz(assets.path())
  assert flat["head/kernel"].shape == (128, 1000)
  # It runs as a headless feature extractor and separates inputs.
  headless = vit.create_model(assets.DEFAULT_MODEL)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1)
  feats = headless.apply({"params": params}, x)
  assert feats.shape == (2, 128)
  assert float(jnp.abs(feats[0] - feats[1]).max()) > 1e-3


def _load_config(name, arg):
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(ROOT, "configs", f"{name}.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_minivtab_config_rejects_unknown_task():
  with pytest.raises(ValueError, match="Unknown task 'cifar'"):
    _load_config("minivtab", "task=cifar")


def test_pretrain_smoke_writes_a_loadable_backbone(tmp_path):
  from vptpc import pretrain

  c = _load_config("pretrain", "smoke,orientation_bins=8")
  card = pretrain.pretrain(c, str(tmp_path))
  assert card["steps"] == c.steps and "upstream_held_out" in card
  # Both auxiliary heads trained and were scored.
  assert {"position_accuracy", "orientation_accuracy"} <= set(
    card["upstream_held_out"]
  )
  model = vit.create_model(c.model, num_classes=c.num_classes)
  template = vit.init_params(model, jax.random.key(0), 32)
  loaded = checkpoint.load_pretrained(tmp_path / "backbone.npz", template)
  assert loaded["head"]["kernel"].shape == (128, c.num_classes)


def test_pretrain_position_weight_zero_trains_on_class_labels_alone(tmp_path):
  from vptpc import pretrain

  c = _load_config("pretrain", "smoke,position_weight=0")
  card = pretrain.pretrain(c, str(tmp_path))
  # The position head is still scored, but its loss adds nothing.
  assert card["log"] and "position_accuracy" in card["upstream_held_out"]
  for row in card["log"]:
    assert row["loss_position"] > 0
    np.testing.assert_allclose(row["loss"], row["loss_class"], rtol=1e-6)
  assert "weight 0: scored, not trained" in card["generator"]


def test_demo_config_runs_end_to_end_in_smoke_mode(tmp_path, data_dir):
  from vptpc import train

  c = _load_config("demo", "smoke")
  c.data.data_dir = data_dir
  c.progress_bar = False
  res = train.train_and_evaluate(c, str(tmp_path))
  assert res["full"]["prompts_per_layer"] == [10] * 6
  assert res["condensed"]["prompts_total"] == 18  # 30% of 60
  assert (tmp_path / "condensed" / "prompts.npz").exists()
  # The embedded backbone's recipe: a zero head on standardised pre-logits
  # starts at chance, ln 16, and the loss stays in its range.
  assert (c.model.head_init, c.model.prelogit_norm) == ("zeros", "standardize")
  rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert rows[0]["step"] == 1
  np.testing.assert_allclose(losses[0], np.log(16), rtol=1e-5)
  assert max(losses) < 2 * np.log(16), losses


@pytest.mark.parametrize("name", ["minivtab", "folder"])
def test_the_embedded_backbone_recipe_is_every_configs_default(name, tmp_path):
  arg = "task=digits"
  if name == "folder":
    for split in ("train", "test"):
      for k in ("a", "b"):
        (tmp_path / split / k).mkdir(parents=True)
        (tmp_path / split / k / "x.png").write_bytes(b"")
    arg = f"root={tmp_path}"
  c = _load_config(name, arg)
  assert c.model.head_init == assets.HEAD_INIT == "zeros"
  assert c.model.prelogit_norm == assets.PRELOGIT_NORM == "standardize"
  # VPT's own recipe stays one argument away.
  if name == "minivtab":
    v = _load_config(name, "head_init=vpt,prelogit_norm=none")
    assert (v.model.head_init, v.model.prelogit_norm) == ("vpt", "none")


def test_suite_smoke_writes_the_tables(tmp_path, data_dir):
  from vptpc import suite

  c = _load_config("suite", "smoke")
  c.data_dir = data_dir
  text = suite.run_suite(c, str(tmp_path))
  assert "| digits |" in text and "mean over tasks" in text
  rows = (tmp_path / "runs.csv").read_text().splitlines()
  assert len(rows) == 1 + 4  # header + 4 methods x 1 task x 1 seed
  assert {r.split(",")[1] for r in rows[1:]} == set(suite.METHODS)
  # VPT-Deep's prompt count was chosen on val200 among (1, 2), the linear
  # probe's LR among (0.1, 1.0).
  deep = tmp_path / "digits" / "deep"
  assert (deep / "select_p1_lr1" / "suite_result.json").exists()
  assert (deep / "select_p2_lr1" / "suite_result.json").exists()
  for lr in ("0.1", "1"):
    sel = tmp_path / "digits" / "linear" / f"select_p0_lr{lr}"
    assert json.loads((sel / "suite_result.json").read_text())["lr"] == float(
      lr
    )
  import csv

  rec = {r["method"]: r for r in csv.DictReader(open(tmp_path / "runs.csv"))}
  assert rec["deep"]["num_prompts"] in ("1", "2")
  assert rec["linear"]["lr"] in ("0.1", "1.0")
  assert set(json.loads(rec["linear"]["val200_grid"])) == {"p0_lr0.1", "p0_lr1"}
  assert "chosen per task on val200" in text
  # A finished suite is not recomputed.
  again = suite.run_suite(c, str(tmp_path))
  assert again.split("Wall time")[0] == text.split("Wall time")[0]


def test_pc_suite_smoke_shares_the_full_model(tmp_path, data_dir):
  from vptpc import suite

  c = _load_config("pc_suite", "smoke")
  c.data_dir = data_dir
  assert set(c.method_order) == {"deep", "pc30", "pc50", "random30", "reduced3"}
  c.method_order = ("deep", "pc30")  # the rest reuse the same paths
  text = suite.run_suite(c, str(tmp_path))
  assert "| digits |" in text
  rows = (tmp_path / "runs.csv").read_text().splitlines()
  assert len(rows) == 1 + 2
  full = tmp_path / "digits" / "pc30" / "seed42" / "full"
  assert full.is_symlink() and (full / "results.json").exists()
  import csv

  recs = {r["method"]: r for r in csv.DictReader(open(tmp_path / "runs.csv"))}
  assert int(recs["pc30"]["prompts_total"]) == 18
  assert recs["pc30"]["full_test_accuracy"] == recs["deep"]["test_accuracy"]


def test_suite_workers_split_the_tasks_and_build_one_table(tmp_path, data_dir):
  from vptpc import suite

  c = _load_config("suite", "smoke")
  c.data_dir = data_dir
  c.tasks = ("digits", "count")
  c.method_order = ("linear",)
  c.methods.linear.select_lr = (1.0,)  # selection is the smoke test's job
  c.workers = 2
  text = suite.run_suite(c, str(tmp_path))
  for t in c.tasks:
    assert (tmp_path / t / "linear" / "seed42" / "suite_result.json").exists()
    assert f"| {t} |" in text
  rows = (tmp_path / "runs.csv").read_text().splitlines()
  assert len(rows) == 1 + 2


def test_suite_table_with_a_fixed_deep_prompt_count(tmp_path):
  from vptpc import suite

  c = _load_config(
    "suite",
    "methods=deep,deep_points=,deep_prompts=3,lrs=1.0,tasks=digits,seeds=42",
  )
  run = tmp_path / "digits" / "deep" / "seed42"
  run.mkdir(parents=True)
  rec = dict(task="digits", method="deep", seed=42, test_accuracy=0.5)
  (run / "suite_result.json").write_text(json.dumps(rec))
  text = suite.run_suite(c, str(tmp_path))  # reads the finished run back
  assert "deep: 10 epochs, lr 1.0, 3 prompts" in text
  assert "| digits | 50.0 ± 0.0 (n=1) |" in text


def test_select_hparams_takes_the_best_val_point_ties_to_the_cheaper(
  tmp_path, monkeypatch
):
  from vptpc import suite, sweep

  # Fake val200 accuracies per (prompt count, LR); one LR diverges (NaN).
  val = {
    (1, 0.1): 0.50,
    (1, 1.0): 0.60,
    (3, 0.1): 0.60,
    (3, 1.0): np.nan,
    (10, 0.1): 0.55,
    (10, 1.0): 0.40,
  }
  jobs = []

  def fake_grid(config, members):
    n = config.prompt.num_prompts
    assert config.data.eval_split == minivtab.SPLITS["val200"]
    jobs.append((n, [lr for lr, _ in members]))
    return [{"eval_accuracy": val[(n, lr)]} for lr, _ in members]

  monkeypatch.setattr(sweep, "train_grid", fake_grid)
  c = _load_config("suite", "deep_points=,deep_prompts=1:3:10,lrs=0.1:1.0")
  got = suite.select_hparams(c, "digits", "deep", str(tmp_path))
  # 0.60 at (1, 1.0) and (3, 0.1): the tie goes to fewer prompts.
  assert (got["num_prompts"], got["lr"]) == (1, 1.0)
  assert got["val_accuracy"]["p3_lr1"] == -1.0  # diverged
  assert jobs == [(1, [0.1, 1.0]), (3, [0.1, 1.0]), (10, [0.1, 1.0])]
  # Finished points are read back, not retrained.
  assert suite.select_hparams(c, "digits", "deep", str(tmp_path)) == got
  assert len(jobs) == 3
  # Equal prompts, equal accuracy: the smaller LR.
  val[(1, 0.1)] = 0.60
  got = suite.select_hparams(c, "digits", "deep", str(tmp_path / "again"))
  assert (got["num_prompts"], got["lr"]) == (1, 0.1)
  assert got["prompt_lr_scale"] == minivtab.PROMPT_LR_SCALE


def test_select_hparams_searches_the_prompt_lr_scale(tmp_path, monkeypatch):
  from vptpc import suite, sweep

  jobs = []

  def fake_grid(config, members):
    n, s = config.prompt.num_prompts, config.prompt.lr_scale
    jobs.append((n, s, [lr for lr, _ in members]))
    # Best: 3 prompts at scale 0.1 and LR 1.0; the linear probe has no
    # prompts, so its scale is not searched.
    return [
      {"eval_accuracy": 0.9 if (n, s, lr) == (3, 0.1, 1.0) else 0.5}
      for lr, _ in members
    ]

  monkeypatch.setattr(sweep, "train_grid", fake_grid)
  c = _load_config(
    "suite", "deep_points=,deep_prompts=1:3,prompt_lr_scales=0.01:0.1"
  )
  got = suite.select_hparams(c, "digits", "deep", str(tmp_path))
  assert (got["num_prompts"], got["lr"], got["prompt_lr_scale"]) == (
    3,
    1.0,
    0.1,
  )
  assert jobs == [
    (1, 0.01, [0.1, 1.0]),
    (1, 0.1, [0.1, 1.0]),
    (3, 0.01, [0.1, 1.0]),
    (3, 0.1, [0.1, 1.0]),
  ]
  assert set(got["val_accuracy"]) == {
    "p1_lr0.1",
    "p1_lr1",
    "p1_lr0.1_ps0.1",
    "p1_lr1_ps0.1",
    "p3_lr0.1",
    "p3_lr1",
    "p3_lr0.1_ps0.1",
    "p3_lr1_ps0.1",
  }
  # The shipped grid lists its points: one job per (prompts, scale).
  jobs.clear()
  got = suite.select_hparams(
    _load_config("suite", ""), "digits", "deep", str(tmp_path / "points")
  )
  assert jobs == [(1, 0.01, [0.1, 1.0]), (10, 1.0, [0.1]), (10, 0.1, [1.0])]
  assert set(got["val_accuracy"]) == {
    "p1_lr0.1",
    "p1_lr1",
    "p10_lr1_ps0.1",
    "p10_lr0.1_ps1",
  }
  with pytest.raises(ValueError, match="deep_points item '3/1.0'"):
    _load_config("suite", "deep_points=3/1.0")
  # A count or scale that the listed points would silently override.
  with pytest.raises(ValueError, match="deep_prompts=.*deep_points="):
    _load_config("suite", "deep_prompts=3")
  with pytest.raises(ValueError, match="prompt_lr_scales="):
    _load_config("suite", "prompt_lr_scales=0.1")
  sel = tmp_path / "select_p3_lr1_ps0.1" / "suite_result.json"
  assert json.loads(sel.read_text())["prompt_lr_scale"] == 0.1
  got = suite.select_hparams(c, "digits", "linear", str(tmp_path / "lin"))
  assert got["num_prompts"] == 0 and len(jobs) == 4


def test_orientation_target_is_the_rotation_the_image_shows():
  # An elongated class rendered without jitter: the principal axis of the
  # ink must turn with the orientation target (mod 180 degrees).
  codes = fractals.make_class_codes(40, seed=5)
  rng = np.random.default_rng(0)

  def axis_deg(img):
    w = img.astype(float).mean(-1)
    w = np.clip(w - np.median(w), 0, None)
    i, j = np.mgrid[: w.shape[0], : w.shape[1]]
    mi, mj = (w * i).sum() / w.sum(), (w * j).sum() / w.sum()
    cii = (w * (i - mi) ** 2).sum()
    cjj = (w * (j - mj) ** 2).sum()
    cij = (w * (i - mi) * (j - mj)).sum()
    aniso = np.hypot(cii - cjj, 2 * cij) / (cii + cjj)
    return np.rad2deg(0.5 * np.arctan2(2 * cij, cii - cjj)), aniso

  # The most elongated class (at its canonical pose).
  canon = fractals.render(codes, np.arange(40), rng, jitter=0.0)[0]
  cls = int(np.argmax([axis_deg(im)[1] for im in canon]))
  imgs, aux = fractals.render(
    codes,
    np.full(64, cls),
    rng,
    jitter=0.0,
    num_points=3000,
    orientation_bins=16,
  )
  ori = aux["orientation"]
  assert ori.min() >= 0 and ori.max() < 16 and len(set(ori)) > 8
  axes = np.array([axis_deg(im)[0] for im in imgs])
  # Angle doubling makes the axis (mod 180) a point on the circle; the axis
  # minus the bin centre must be one constant, up to the bin's half-width
  # and rendering noise. Independent angles would spread round the circle.
  centre = (ori + 0.5) * 360 / 16
  d = np.deg2rad(2 * (axes - centre))
  resultant = np.abs(np.mean(np.exp(1j * d)))
  assert resultant > 0.6, resultant  # measured 0.83; shuffled ~0.1
  # Shuffling the targets breaks it.
  d = np.deg2rad(2 * (axes - rng.permutation(centre)))
  assert np.abs(np.mean(np.exp(1j * d))) < 0.5


def test_hog_targets_mirror_under_a_flip_and_find_stripes():
  from vptpc import pretrain

  rng = np.random.default_rng(0)
  img = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  h = pretrain.hog_targets(img, 4, 8)
  assert h.shape == (2, 4, 8)
  np.testing.assert_allclose(
    (np.asarray(h) ** 2).sum(-1).mean(-1), 1.0, rtol=1e-4
  )
  # A column flip turns gradient angle t into 180 - t: bin k -> 7 - k, and
  # patch (i, j) -> (i, 1 - j).
  hf = pretrain.hog_targets(img[:, :, ::-1], 4, 8)
  mirrored = (
    np.asarray(h).reshape(2, 2, 2, 8)[:, :, ::-1, ::-1].reshape(2, 4, 8)
  )
  np.testing.assert_allclose(hf, mirrored, atol=1e-5)
  # Stripes along the rows (intensity varies down the columns) have
  # vertical gradients (90 degrees): all mass in the two middle bins.
  stripes = jnp.broadcast_to(
    jnp.sin(jnp.arange(8.0))[None, :, None, None], (1, 8, 8, 3)
  )
  hs = np.asarray(pretrain.hog_targets(stripes, 4, 8))
  assert np.all(hs[..., 3:5].sum(-1) > 0.99 * np.linalg.norm(hs, axis=-1))


def test_principal_axis_bins_follow_the_blob_and_ignore_round_ones():
  i, j = np.mgrid[:32, :32] - 15.5

  def blob(angle_deg, ratio=4.0):
    t = np.deg2rad(angle_deg)
    u = np.cos(t) * j + np.sin(t) * i  # along the axis (column -> row)
    v = -np.sin(t) * j + np.cos(t) * i
    return np.exp(-(u**2) / (2 * 6.0**2) - v**2 / (2 * (6.0 / ratio) ** 2))

  # Bin centres (8 bins of 22.5 degrees), away from the edges.
  w = np.stack(
    [blob(a) for a in (11.25, 56.25, 101.25, 146.25)] + [blob(30, 1.0)]
  )
  np.testing.assert_array_equal(
    fractals.principal_axis_bins(w, 8, 0.6), [0, 2, 4, 6, -1]
  )


def test_second_stage_pretraining_continues_from_a_backbone(tmp_path):
  from vptpc import pretrain

  first = pretrain.pretrain(
    _load_config("pretrain", "smoke"), str(tmp_path / "a")
  )
  c = _load_config(
    "pretrain",
    f"smoke,init_from={tmp_path / 'a' / 'backbone.npz'},hog_bins=8,"
    "axis_bins=8,rotate_fraction=0.5",
  )
  card = pretrain.pretrain(c, str(tmp_path / "b"))
  ev = card["upstream_held_out"]
  assert {"axis_accuracy", "loss_hog", "hog_r2"} <= set(ev)
  assert "continued from" in card["generator"]
  model = vit.create_model(c.model, num_classes=c.num_classes)
  template = vit.init_params(model, jax.random.key(0), 32)
  checkpoint.load_pretrained(tmp_path / "b" / "backbone.npz", template)
  # At learning rate 0 the second stage writes back the first stage's
  # weights exactly: it starts from them, not from a random init.
  c.lr = 0.0
  pretrain.pretrain(c, str(tmp_path / "c"))
  a = npz_checkpoint.read_npz(tmp_path / "a" / "backbone.npz")
  b = npz_checkpoint.read_npz(tmp_path / "c" / "backbone.npz")
  assert a.keys() == b.keys() and first["steps"] == c.steps
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cv_recipe_refuses_a_finished_fold_of_another_recipe(tmp_path):
  path = os.path.join(
    os.path.dirname(__file__), "..", "benchmarks", "cv_recipe.py"
  )
  spec = importlib.util.spec_from_file_location("cv_recipe", path)
  cv = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cv)
  assert cv.fold_splits(0) == ("train[200:1000]", "train[0:200]")
  assert cv.fold_splits(4) == ("train[0:800]", "train[800:1000]")
  kw = {"num_prompts": 0, "base_lr": 1.0}
  os.makedirs(tmp_path / "lin" / "f2")
  with open(tmp_path / "lin" / "f2" / "acc.json", "w") as f:
    json.dump({"acc": 0.5, "task": "digits", "recipe": kw}, f)
  assert cv.run_fold("digits", "lin", kw, 2, str(tmp_path)) == 0.5
  with pytest.raises(SystemExit, match=r"acc.json holds recipe 'lin'.*0\.1"):
    cv.run_fold(
      "digits", "lin", {"num_prompts": 0, "base_lr": 0.1}, 2, str(tmp_path)
    )
  with pytest.raises(SystemExit, match="'count'"):
    cv.run_fold("count", "lin", kw, 2, str(tmp_path))


@pytest.mark.parametrize(
  "arg, key",
  [
    ("hog_bins=8,hog_block=6", "hog_block=6"),
    ("rotate_fraction=1.5", "rotate_fraction=1.5"),
    ("axis_bins=-2", "axis_bins=-2"),
    ("position_weight=-1.0", "position_weight=-1.0"),
  ],
)
def test_pretrain_names_an_out_of_range_key(tmp_path, arg, key):
  from vptpc import pretrain

  with pytest.raises(ValueError, match=key):
    pretrain.pretrain(_load_config("pretrain", f"smoke,{arg}"), str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before writing anything
