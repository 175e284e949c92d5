"""The README's front door and the docs stay true to the code."""

import ast
import os
import pathlib
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


# The code map and the API reference name every module, so neither drifts
# from the package as modules come and go.
PACKAGE = pathlib.Path(ROOT) / "vptpc"
DOCS = pathlib.Path(ROOT) / "docs"


def _has_content(init: pathlib.Path) -> bool:
  """Whether a package's ``__init__`` has a docstring or a public name."""
  tree = ast.parse(init.read_text())
  if ast.get_docstring(tree):
    return True
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names = [node.name]
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [(a.asname or a.name).split(".")[0] for a in node.names]
    elif isinstance(node, ast.Assign):
      names = [t.id for t in node.targets if isinstance(t, ast.Name)]
    else:
      names = []
    if any(not n.startswith("_") for n in names):
      return True
  return False


def _module_files() -> list[str]:
  """Every module file under vptpc/ but ``__init__.py``: vptpc/data/toy.py."""
  return sorted(
    p.relative_to(ROOT).as_posix()
    for p in PACKAGE.rglob("*.py")
    if p.name != "__init__.py"
  )


def _module_names() -> list[str]:
  """Every importable module, ``vptpc.data.toy``.

  A package counts when its ``__init__`` has a docstring or public names.
  """
  out = []
  for p in PACKAGE.rglob("*.py"):
    parts = list(p.relative_to(ROOT).with_suffix("").parts)
    if p.name == "__init__.py":
      if not _has_content(p):
        continue
      parts = parts[:-1]
    out.append(".".join(parts))
  return sorted(out)


def _code_map_rows() -> set[str]:
  """The module paths the first column of docs/code_map.md names."""
  named = set()
  for line in (DOCS / "code_map.md").read_text().splitlines():
    if line.startswith("|"):
      first = line.split("|")[1]
      named.update(re.findall(r"`(vptpc/[\w/]+\.py)`", first))
  return named


def test_code_map_names_every_module():
  named = _code_map_rows()
  missing = [m for m in _module_files() if m not in named]
  assert not missing, (
    f"docs/code_map.md has no row for {', '.join(missing)}: add a row "
    "| `vptpc/<module>.py` | what lives there | for each (a row may name "
    "several modules)."
  )
  stale = sorted(m for m in named if not (pathlib.Path(ROOT) / m).exists())
  assert not stale, (
    f"docs/code_map.md names {', '.join(stale)}, which no longer exist: "
    "remove or rename them."
  )


def test_api_reference_has_every_module():
  text = (DOCS / "api.md").read_text()
  documented = set(re.findall(r"^\.\. automodule:: ([\w.]+)\s*$", text, re.M))
  modules = _module_names()
  missing = [m for m in modules if m not in documented]
  assert not missing, (
    f"docs/api.md has no section for {', '.join(missing)}: add, for each, "
    "## <module>, then an eval-rst block with '.. automodule:: <module>' "
    "and '   :members:'."
  )
  stale = sorted(documented - set(modules))
  assert not stale, (
    f"docs/api.md documents {', '.join(stale)}, which no longer exist (or "
    "have neither docstring nor public names): remove their sections."
  )
