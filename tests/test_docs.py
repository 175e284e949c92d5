"""The README's front door and the docs stay true to the code."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
sys.path.insert(0, os.path.join(ROOT, "docs"))

import gen_config_reference  # noqa: E402


def _readme() -> str:
  with open(README) as f:
    return f.read()


def test_readme_is_a_front_door():
  assert len(_readme().encode()) <= 12 * 1024


def test_readme_python_tour_runs(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  assert blocks and len(blocks[0].splitlines()) <= 30
  monkeypatch.chdir(tmp_path)  # it writes task.npz
  exec(compile(blocks[0], "README.md", "exec"), {})
  assert (tmp_path / "task.npz").exists()


def test_readme_links_and_configs_exist():
  text = _readme()
  for link in re.findall(r"\]\(((?:docs|results)/[^)#]+)\)", text):
    assert os.path.exists(os.path.join(ROOT, link)), link
  for cfg in set(re.findall(r"configs/\w+\.py", text)):
    assert os.path.exists(os.path.join(ROOT, cfg)), cfg
  for path in set(re.findall(r"`(results/[\w/]+)/?`", text)):
    assert os.path.exists(os.path.join(ROOT, path)), path


def test_configuration_reference_is_current():
  assert gen_config_reference.main(["--check"]) == 0, (
    "docs/configuration.md is stale: python docs/gen_config_reference.py"
  )


@pytest.mark.parametrize("name", ["vtab.py", "minivtab.py", "folder.py"])
def test_configuration_reference_lists_every_argument(name):
  with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
    page = f.read()
  section = page.split(f"## `configs/{name}`", 1)[1].split("\n## ", 1)[0]
  spec = gen_config_reference.arg_spec(gen_config_reference._load(name))
  for key, default in spec.items():
    assert f"| `{key}` |" in section, key
    assert gen_config_reference._fmt(default) in section, key
