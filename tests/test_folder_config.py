"""Your own data: `configs/folder.py` over both folder layouts."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from vptpc import preflight, protocol
from vptpc.data import folder_layout, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_config(arg):
  spec = importlib.util.spec_from_file_location(
    "folder_cfg", os.path.join(ROOT, "configs", "folder.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _png(path, seed):
  arr = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path)


def class_folders(tmp_path, classes=("cat", "dog", "owl"), n=5, val=False):
  root = tmp_path / "pets"
  for split in ("train", "test") + (("val",) if val else ()):
    for c in classes:
      for i in range(n):
        _png(root / split / c / f"{i}.png", hash((split, c, i)) % 1000)
  return root


def split_files(
  tmp_path, stems=("train800", "val200", "train800val200", "test")
):
  root = tmp_path / "vtabish"
  lines = []
  for i in range(12):
    _png(root / "images" / f"{i}.png", i)
    lines.append(f"images/{i}.png {i % 4}")
  for s in stems:
    (root / f"{s}.txt").write_text("\n".join(lines) + "\n")
  return root


def test_class_folders_describe_and_slices(tmp_path):
  root = class_folders(tmp_path)
  info = folder_layout.describe(str(root))
  assert info["layout"] == "class_folders" and info["name"] == "pets"
  assert info["class_names"] == ["cat", "dog", "owl"]
  assert info["num_classes"] == 3
  # No val/: the tune splits are a fixed 80/20 division of train.
  assert info["tune_splits"] == ("train[:80%]", "train[80%:]")
  a = folder_layout.class_folder_items(str(root), "train[:80%]")
  b = folder_layout.class_folder_items(str(root), "train[80%:]")
  whole = folder_layout.class_folder_items(str(root), "train")
  assert len(a) == 12 and len(b) == 3
  assert sorted(a + b) == sorted(whole) and not set(a) & set(b)
  assert all(p.startswith("train/") for p, _ in whole)
  assert {lbl for _, lbl in whole} == {0, 1, 2}
  info = folder_layout.describe(str(class_folders(tmp_path / "v", val=True)))
  assert info["tune_splits"] == ("train", "val")


def test_class_folder_errors_name_the_problem(tmp_path):
  root = class_folders(tmp_path)
  _png(root / "test" / "emu" / "0.png", 1)
  with pytest.raises(folder_layout.LayoutError, match="emu"):
    folder_layout.class_folder_items(str(root), "test")
  with pytest.raises(folder_layout.LayoutError, match="does not exist"):
    folder_layout.describe(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(folder_layout.LayoutError, match="neither"):
    folder_layout.describe(str(tmp_path / "empty"))
  with pytest.raises(folder_layout.LayoutError, match="name\\[lo:hi\\]"):
    folder_layout.parse_split("train[:5")


def test_split_files_describe(tmp_path):
  info = folder_layout.describe(str(split_files(tmp_path)))
  assert info["layout"] == "split_files" and info["num_classes"] == 4
  assert info["tune_splits"] == ("train800", "val200")
  assert info["final_splits"] == ("train800val200", "test")
  two = folder_layout.describe(
    str(split_files(tmp_path / "b", ("train", "test")))
  )
  assert two["tune_splits"] == ("train[:80%]", "train[80%:]")
  assert two["final_splits"] == ("train", "test")
  src = sources.FolderSource(str(tmp_path / "b" / "vtabish"), "train[80%:]")
  assert len(src) == 12 - round(12 * 0.8)


def test_folder_config_names_the_task_and_infers_classes(tmp_path):
  root = class_folders(tmp_path)
  c = folder_config(f"root={root},mode=tune")
  assert c.data.name == "pets" and c.data.num_classes == 3
  assert c.data.source == "folder" and c.data.folder == str(root)
  assert c.model.name == "fractal-Ti/4" and c.data.image_size == 32
  assert c.model.checkpoint_path.endswith("fractal_vit_ti4.npz")
  assert c.data.normalize == "minus1_1"  # the embedded backbone's
  real = folder_config(f"root={root},model=B/16,checkpoint=/w/vit.npz")
  assert real.data.image_size == 224 and real.data.normalize == "imagenet"
  assert real.model.checkpoint_path == "/w/vit.npz"
  with pytest.raises(ValueError, match="root=PATH"):
    folder_config("")


def _preflight(root, tmp_path):
  """The preflight's problems and warnings for configs/folder.py on root."""
  c = folder_config(f"root={root}")
  try:
    plan = preflight.check(c, str(tmp_path / "w"))
  except preflight.PreflightError as e:
    return e.problems, []
  return [], plan.warnings


def test_an_empty_class_folder_is_an_error_in_train_a_warning_in_test(
  tmp_path,
):
  root = class_folders(tmp_path, classes=("cat", "dog", "emu", "owl", "yak"))
  for c in ("dog", "emu", "owl", "yak"):
    for f in (root / "train" / c).iterdir():
      f.rename(f.with_suffix(".heic"))  # a suffix vptpc does not read
  problems, _ = _preflight(root, tmp_path)
  assert problems == [
    f"4 class folders in {root}/train hold no image (dog, emu, owl and 1 "
    "more): the class count comes from these folders, so each needs "
    "training images (files ending .jpg, .jpeg, .png ...): add them or "
    "remove the folder."
  ]
  root = class_folders(tmp_path / "b")
  for f in (root / "test" / "dog").iterdir():
    f.unlink()
  problems, warnings = _preflight(root, tmp_path)
  assert problems == [] and len(warnings) == 1
  assert f"1 class folder in {root}/test holds no image (dog)" in warnings[0]
  assert not (tmp_path / "w").exists()


def test_a_dataset_of_one_class_is_refused_naming_it(tmp_path):
  root = class_folders(tmp_path, classes=("cat",))
  problems, _ = _preflight(root, tmp_path)
  assert problems == [
    f"folder dataset {root} has 1 class in split 'train' (its only class "
    "is train/cat): a classifier needs at least 2; add the other classes' "
    "images."
  ]
  root = split_files(tmp_path / "s", ("train", "test"))
  for s in ("train", "test"):
    lines = (root / f"{s}.txt").read_text().splitlines()
    (root / f"{s}.txt").write_text(
      "".join(f"{ln.split()[0]} 3\n" for ln in lines)
    )
  problems, _ = _preflight(root, tmp_path)
  assert len(problems) == 1, problems
  assert "train.txt labels every image 3" in problems[0]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("layout", ["class_folders", "split_files"])
def test_folder_protocol_runs_every_mode(tmp_path, layout):
  root = (
    class_folders(tmp_path)
    if layout == "class_folders"
    else split_files(tmp_path)
  )
  for mode in ("single", "tune", "final"):
    c = folder_config(f"root={root},mode={mode},smoke")
    c.parallel = "jit"
    out = protocol.run(c, str(tmp_path / "runs" / mode))
    assert out
  single = json.loads((tmp_path / "runs" / "single" / "data.json").read_text())
  assert single["train"]["name"] == root.name  # named after the folder
  tune = json.loads((tmp_path / "runs" / "tune" / "tune.json").read_text())
  assert tune["task"] == root.name and len(tune["grid"]) == 2
  final = json.loads((tmp_path / "runs" / "final" / "final.json").read_text())
  assert len(final["seeds"]) == 2


def test_folder_task_on_the_embedded_backbone(tmp_path):
  root = class_folders(tmp_path)
  c = folder_config(f"root={root},epochs=1,batch_size=8")
  c.parallel = "jit"
  c.progress_bar = False
  res = protocol.run(c, str(tmp_path / "run"))
  assert res["eval_examples"] == 15 and res["prompts_per_layer"] == [10] * 6


@pytest.mark.parametrize(
  "model, want",
  [
    ("B/16", "imagenet21k_ViT-B_16.npz"),
    ("swin_b", "swin_base_patch4_window7_224.ms_in22k.safetensors"),
    ("L/16", None),  # no standard file: checkpoint=PATH is required
  ],
)
def test_folder_config_picks_the_models_standard_checkpoint(
  tmp_path, model, want
):
  root = class_folders(tmp_path)
  if want is None:
    with pytest.raises(ValueError, match="checkpoint=PATH"):
      folder_config(f"root={root},model={model}")
    return
  c = folder_config(f"root={root},model={model}")
  assert c.model.checkpoint_path == want
  assert c.data.image_size == 224 and c.data.normalize == "imagenet"
