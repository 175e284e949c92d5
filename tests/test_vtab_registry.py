"""Tests for the VTAB-1k / FGVC registry (vptpc.data.vtab)."""

import io
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vptpc.data import decoding, vtab

# docs/references.md, "VTAB-1k: the 19 tasks", in its order.
VTAB_ORDER = [
  "caltech101",
  "cifar100",
  "dtd",
  "oxford_flowers102",
  "oxford_iiit_pet",
  "svhn",
  "sun397",
  "patch_camelyon",
  "eurosat",
  "resisc45",
  "diabetic_retinopathy",
  "clevr_count",
  "clevr_dist",
  "dmlab",
  "kitti_dist",
  "dsprites_loc",
  "dsprites_ori",
  "smallnorb_azi",
  "smallnorb_ele",
]

# docs/references.md, "VPT: per-task prompt counts".
PROMPTS = {
  "cifar100": 10,
  "caltech101": 10,
  "dtd": 10,
  "oxford_flowers102": 1,
  "oxford_iiit_pet": 1,
  "svhn": 50,
  "sun397": 5,
  "patch_camelyon": 100,
  "eurosat": 100,
  "resisc45": 10,
  "diabetic_retinopathy": 1,
  "clevr_count": 100,
  "clevr_dist": 200,
  "dmlab": 100,
  "kitti_dist": 100,
  "dsprites_loc": 100,
  "dsprites_ori": 100,
  "smallnorb_azi": 200,
  "smallnorb_ele": 200,
}

# VPT's pinned versions that TFDS 4.9.10 can no longer construct (it ships
# caltech101 3.0.2, oxford_iiit_pet 4.0.0 and svhn_cropped 3.1.0). The registry keeps the pins (see each row's
# notes); their features are unchanged for the example functions, so these
# rows are mocked at the version TFDS ships.
DRIFTED = {"caltech101", "oxford_iiit_pet", "svhn"}

FGVC_TFDS = [k for k, t in vtab.FGVC.items() if t.tfds_name]
FGVC_FOLDER = [k for k, t in vtab.FGVC.items() if not t.tfds_name]


def _mock_examples(task, num_examples=8):
  """Examples of ``task``'s train split from `tfds.testing.mock_data`.

  Mock data has random features and ignores split slicing; it needs no
  TensorFlow and no prepared data.
  """
  split = task.splits["train800" if task.benchmark == "vtab" else "train"]
  with tfds.testing.mock_data(num_examples=num_examples):
    try:
      src = tfds.data_source(task.tfds_name, split=split, download=False)
    except AssertionError as e:
      if "cannot be loaded at version" not in str(e):
        raise
      assert task.key in DRIFTED, f"{task.key}: {e}"
      name = task.tfds_name.split(":")[0]
      src = tfds.data_source(name, split=split, download=False)
    else:
      assert task.key not in DRIFTED, f"{task.tfds_name} is constructible now"
    return [src[i] for i in range(len(src))]


def _make_valid(key, example, i):
  """Moves random mock features into the range the label rule expects."""
  ex = dict(example)
  if key.startswith("clevr"):
    objects = dict(ex["objects"])
    k = 3 + i % 8  # 3..10 objects.
    objects["size"] = np.resize(objects["size"], k)
    coords = np.resize(objects["pixel_coords"], (k, 3)).astype(np.float32)
    coords[:, 2] = 7.0 + 4.0 * coords[:, 2]  # Depths in [7, 11].
    objects["pixel_coords"] = coords
    ex["objects"] = objects
  elif key == "kitti_dist":
    objects = dict(ex["objects"])
    location = np.array(objects["location"], np.float32)
    location[:, 2] *= 40.0  # Depths in [0, 40] m.
    objects["location"] = location
    # Mock sequences have independent random lengths; real ones match.
    objects["type"] = np.resize(objects["type"], len(location))
    ex["objects"] = objects
  elif key.startswith("dsprites"):
    ex["image"] = ex["image"] % 2  # dSprites images are 0/1.
  return ex


def _check_examples(task, examples):
  labels = []
  for i, example in enumerate(examples):
    raw = np.asarray(example["image"])
    image, label = task.example_fn(_make_valid(task.key, example, i))
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint8 and image.ndim == 3
    assert image.shape == (*raw.shape[:2], 3)
    assert type(label) is int
    assert 0 <= label < task.num_classes, (task.key, label)
    labels.append(label)
  return labels


# ---------------------------------------------------------------------------
# VTAB rows.


def test_vtab_has_19_rows_in_order():
  assert list(vtab.VTAB) == VTAB_ORDER
  groups = [t.group for t in vtab.VTAB.values()]
  assert groups == ["natural"] * 7 + ["specialized"] * 4 + ["structured"] * 8
  assert vtab.GROUPS == ("natural", "specialized", "structured")
  assert set(vtab.TASKS) == set(vtab.VTAB) | set(vtab.FGVC)
  assert len(vtab.TASKS) == 24


@pytest.mark.parametrize("key", list(vtab.VTAB))
def test_vtab_row(key):
  task = vtab.VTAB[key]
  assert task.key == key and task.benchmark == "vtab"
  assert task.group in vtab.GROUPS
  assert set(task.splits) == {"train800", "val200", "train800val200", "test"}
  assert task.splits["train800"] == "train[:800]"
  assert task.splits["train800val200"] == (
    task.splits["train800"] + "+" + task.splits["val200"]
  )
  assert task.vpt_name.startswith("vtab-")
  assert ":" in task.tfds_name
  assert set(task.published) == {"full_ft", "vpt_shallow", "vpt_deep"}
  assert all(0 < v < 100 for v in task.published.values())
  assert task.num_prompts == PROMPTS[key]
  assert task.num_prompts_source
  pickle.dumps(task.example_fn)  # Picklable for worker processes.

  labels = _check_examples(task, _mock_examples(task))
  assert len(labels) == 8


@pytest.mark.parametrize(
  "key,val200,test",
  [
    ("caltech101", "train[2754:2954]", "test"),
    ("cifar100", "train[45000:45200]", "test"),
    ("oxford_iiit_pet", "train[2944:3144]", "test"),
    ("svhn", "train[65931:66131]", "test"),
    ("eurosat", "train[16200:16400]", "train[21600:]"),
    ("resisc45", "train[18900:19100]", "train[25200:]"),
    ("clevr_count", "train[63000:63200]", "validation"),
    ("clevr_dist", "train[63000:63200]", "validation"),
    ("dsprites_loc", "train[589824:590024]", "train[663552:]"),
    ("dsprites_ori", "train[589824:590024]", "train[663552:]"),
    ("smallnorb_azi", "test[:200]", "test[50%:]"),
    ("smallnorb_ele", "test[:200]", "test[50%:]"),
    ("dmlab", "validation[:200]", "test"),
  ],
)
def test_vtab_split_strings(key, val200, test):
  splits = vtab.VTAB[key].splits
  assert (splits["val200"], splits["test"]) == (val200, test)


def test_vtab_versions_and_manual_steps():
  names = {k: t.tfds_name for k, t in vtab.VTAB.items()}
  assert names["kitti_dist"] == "kitti:3.2.0"
  assert names["dmlab"] == "dmlab:2.0.1"
  assert names["sun397"] == "sun397/tfds:4.0.0"
  assert names["eurosat"] == "eurosat/rgb:2.0.0"
  assert names["diabetic_retinopathy"] == (
    "diabetic_retinopathy_detection/btgraham-300:3.0.0"
  )
  manual = {k for k, t in vtab.VTAB.items() if t.manual}
  assert manual == {"resisc45", "diabetic_retinopathy"}
  assert "NWPU-RESISC45.rar" in vtab.VTAB["resisc45"].manual
  assert "kaggle" in vtab.VTAB["diabetic_retinopathy"].manual.lower()
  for key in ("sun397", "eurosat", "dmlab"):
    assert "verified" in vtab.VTAB[key].num_prompts_source
  assert "unverified" in vtab.VTAB["svhn"].num_prompts_source


# ---------------------------------------------------------------------------
# Label rules on hand-built examples.


def _image(h=4, w=5, c=3):
  return np.arange(h * w * c, dtype=np.uint8).reshape(h, w, c)


def _clevr(depths):
  n = len(depths)
  coords = np.zeros((n, 3), np.float32)
  coords[:, 2] = depths
  return {
    "image": _image(),
    "objects": {"size": np.zeros(n, np.int64), "pixel_coords": coords},
  }


@pytest.mark.parametrize(
  "depths,label",
  [
    ([8.0], 0),
    ([8.01], 1),
    ([10.5], 5),
    ([12.0, 10.5, 9.2], 3),
    ([0.5], 0),
    ([8.5], 1),
    ([9.75], 4),
    ([99.0], 5),
  ],
)
def test_clevr_dist(depths, label):
  assert decoding.clevr_dist(_clevr(depths)) == label
  assert vtab.VTAB["clevr_dist"].example_fn(_clevr(depths))[1] == label


def test_clevr_dist_out_of_range_is_not_clipped():
  assert decoding.clevr_dist(_clevr([150.0])) == 6
  assert decoding.clevr_dist(_clevr([-1.0])) == -1


@pytest.mark.parametrize("n,label", [(3, 0), (6, 3), (10, 7), (11, 8)])
def test_clevr_count(n, label):
  example = _clevr([9.0] * n)
  assert decoding.clevr_count(example) == label
  assert vtab.VTAB["clevr_count"].example_fn(example)[1] == label


def _kitti(objects):
  """``objects``: (type, depth) pairs."""
  types = np.array([t for t, _ in objects], np.int64)
  location = np.zeros((len(objects), 3), np.float32)
  location[:, 2] = [d for _, d in objects]
  return {"image": _image(), "objects": {"type": types, "location": location}}


@pytest.mark.parametrize(
  "objects,label",
  [
    ([], 3),
    ([(3, 5.0)], 3),  # Only a pedestrian.
    ([(0, 5.0)], 0),  # Car.
    ([(0, 8.0)], 0),
    ([(0, 8.5)], 1),
    ([(1, 15.0)], 1),  # Van.
    ([(2, 30.0)], 2),  # Truck.
    ([(3, 2.0), (7, 1.0), (2, 30.0)], 2),  # Non-vehicles ignored.
    ([(1, 25.0), (0, 12.0)], 1),
    ([(0, 1500.0)], 3),  # task_adaptation appends 1000.
  ],
)
def test_kitti_dist(objects, label):
  assert decoding.kitti_dist(_kitti(objects)) == label
  assert vtab.VTAB["kitti_dist"].example_fn(_kitti(objects))[1] == label


def _dsprites(x=0, orientation=0):
  image = np.zeros((64, 64, 1), np.uint8)
  image[10:20, 30:40] = 1
  return {
    "image": image,
    "label_x_position": np.int64(x),
    "label_orientation": np.int64(orientation),
  }


@pytest.mark.parametrize(
  "x,label", [(0, 0), (1, 0), (2, 1), (17, 8), (31, 15), (32, 16)]
)
def test_dsprites_loc(x, label):
  assert decoding.dsprites_loc(_dsprites(x=x)) == label


@pytest.mark.parametrize(
  "orientation,label",
  [(0, 0), (2, 0), (3, 1), (5, 2), (24, 9), (25, 10), (39, 15)],
)
def test_dsprites_ori(orientation, label):
  assert decoding.dsprites_ori(_dsprites(orientation=orientation)) == label
  assert label == int(np.floor(orientation / 2.5))


def test_dsprites_image_is_0_255_rgb():
  for key in ("dsprites_loc", "dsprites_ori"):
    image, label = vtab.VTAB[key].example_fn(_dsprites(x=31, orientation=39))
    assert label == 15
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert set(np.unique(image)) == {0, 255}
    assert (image[10:20, 30:40] == 255).all() and image[0, 0, 0] == 0
  bad = _dsprites()
  bad["image"] = bad["image"] * 255
  with pytest.raises(ValueError, match="0/1"):
    vtab.VTAB["dsprites_loc"].example_fn(bad)


def test_smallnorb_tiles_first_camera():
  gray = np.arange(96 * 96, dtype=np.uint32).reshape(96, 96, 1) % 251
  example = {
    "image": gray.astype(np.uint8),
    "image2": np.zeros((96, 96, 1), np.uint8),
    "label_azimuth": np.int64(17),
    "label_elevation": np.int64(8),
  }
  image, label = vtab.VTAB["smallnorb_azi"].example_fn(example)
  assert label == 17
  assert image.shape == (96, 96, 3) and image.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], example["image"][..., 0])
  assert vtab.VTAB["smallnorb_ele"].example_fn(example)[1] == 8


def test_default_label_is_not_clipped():
  example = {"image": _image(), "label": np.int64(102)}
  image, label = vtab.VTAB["caltech101"].example_fn(example)
  assert label == 102 and type(label) is int
  np.testing.assert_array_equal(image, example["image"])


# ---------------------------------------------------------------------------
# FGVC rows.


@pytest.mark.parametrize("key", FGVC_TFDS)
def test_fgvc_tfds_row(key):
  task = vtab.FGVC[key]
  assert task.benchmark == "fgvc" and task.group == "fgvc"
  assert task.splits == {
    "train": "train[:90%]",
    "val": "train[90%:]",
    "trainval": "train",
    "test": "test",
  }
  assert set(task.published) == {"full_ft", "linear", "vpt_shallow", "vpt_deep"}
  assert task.num_prompts == 10 and "not found" in task.num_prompts_source
  assert not task.manual
  _check_examples(task, _mock_examples(task))


@pytest.mark.parametrize("key", FGVC_FOLDER)
def test_fgvc_folder_row(key, tmp_path):
  task = vtab.FGVC[key]
  assert task.tfds_name == ""
  assert task.splits == {s: s for s in ("train", "val", "trainval", "test")}
  root = vtab.folder_root("<data_dir>", key)
  assert os.path.join("vptpc_folders", key) in root
  for part in ("images/", "train.txt", "val.txt", "trainval.txt", "test.txt"):
    assert part in task.manual, (key, part)
  # A folder reader's example: PNG bytes or a decoded array, an int label.
  png = io.BytesIO()
  Image.fromarray(_image(6, 7)).save(png, format="PNG")
  for image in (png.getvalue(), _image(6, 7)):
    out, label = task.example_fn({"image": image, "label": 5})
    np.testing.assert_array_equal(out, _image(6, 7))
    assert label == 5


def test_fgvc_rows():
  assert list(vtab.FGVC) == ["cub", "nabirds", "flowers", "dogs", "cars"]
  assert {k: t.num_classes for k, t in vtab.FGVC.items()} == {
    "cub": 200,
    "nabirds": 555,
    "flowers": 102,
    "dogs": 120,
    "cars": 196,
  }
  assert vtab.FGVC["cub"].tfds_name == "caltech_birds2011:0.2.0"
  assert vtab.FGVC["flowers"].tfds_name == "oxford_flowers102:2.1.1"
  assert vtab.FGVC["dogs"].tfds_name == "stanford_dogs:0.2.0"
  assert FGVC_FOLDER == ["nabirds", "cars"]
  deep = [t.published["vpt_deep"] for t in vtab.FGVC.values()]
  assert np.mean(deep) == pytest.approx(vtab.PUBLISHED_FGVC_MEANS["vpt_deep"])


# ---------------------------------------------------------------------------
# Lookup, folders, images.


def test_get_task():
  assert vtab.get_task("dsprites_loc") is vtab.VTAB["dsprites_loc"]
  assert vtab.get_task("cub") is vtab.FGVC["cub"]
  with pytest.raises(ValueError, match="nope") as e:
    vtab.get_task("nope")
  assert "caltech101" in str(e.value) and "cars" in str(e.value)


def test_folder_root():
  assert vtab.folder_root("/data", "nabirds") == os.path.join(
    "/data", "vptpc_folders", "nabirds"
  )


def _encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def test_decode_image_bytes():
  rgb = _image(6, 7)
  np.testing.assert_array_equal(decoding.decode_image(_encode(rgb, "PNG")), rgb)
  gray = np.arange(42, dtype=np.uint8).reshape(6, 7)
  out = decoding.decode_image(_encode(gray, "PNG"))
  assert out.shape == (6, 7, 3)
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
  jpeg = decoding.decode_image(np.bytes_(_encode(rgb, "JPEG")))
  assert jpeg.shape == (6, 7, 3) and jpeg.dtype == np.uint8


def test_decode_image_arrays():
  gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
  for value in (gray, gray[..., None]):
    out = decoding.decode_image(value)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 2], gray)
  rgb = _image()
  assert decoding.decode_image(rgb) is rgb
  np.testing.assert_array_equal(
    decoding.decode_image(rgb.astype(np.int64)), rgb
  )
  with pytest.raises(ValueError, match="shape"):
    decoding.decode_image(np.zeros((4, 5, 4), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    decoding.decode_image(np.zeros((4, 5, 3), np.float32))


# ---------------------------------------------------------------------------
# Published aggregates (docs/references.md, "VPT: published numbers").


@pytest.mark.parametrize("method", ["vpt_deep", "full_ft"])
def test_group_means_match_published(method):
  published = vtab.PUBLISHED_MEANS[method]
  group_means = []
  for group in vtab.GROUPS:
    values = [
      t.published[method] for t in vtab.VTAB.values() if t.group == group
    ]
    group_means.append(np.mean(values))
    assert np.mean(values) == pytest.approx(published[group], abs=0.05)
  assert np.mean(group_means) == pytest.approx(
    published["mean_of_groups"], abs=0.05
  )


@pytest.mark.parametrize("method", ["vpt_deep", "full_ft", "vpt_shallow"])
def test_19_task_mean_matches_published(method):
  values = [t.published[method] for t in vtab.VTAB.values()]
  assert len(values) == 19
  assert np.mean(values) == pytest.approx(
    vtab.PUBLISHED_MEANS[method]["mean_19"], abs=0.05
  )


def test_vpt_deep_means_are_the_reference_values():
  deep = vtab.PUBLISHED_MEANS["vpt_deep"]
  assert (deep["natural"], deep["specialized"], deep["structured"]) == (
    78.48,
    82.43,
    54.98,
  )
  assert (deep["mean_of_groups"], deep["mean_19"]) == (71.96, 69.43)


def test_moved_names_warn_and_resolve():
  for name in ("decode_image", "CLEVR_DIST_THRESHOLDS"):
    with pytest.warns(DeprecationWarning, match=f"vptpc.data.decoding.{name}"):
      assert getattr(vtab, name) is getattr(decoding, name)
  with pytest.raises(AttributeError, match="no_such_name"):
    vtab.no_such_name  # noqa: B018
