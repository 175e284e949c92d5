"""The package's shape: an acyclic import graph, imports at module top.

Read from the source with `ast` (nothing is imported), so these run in
milliseconds. Every ``import`` statement counts, at module top or inside a
function. Two things are not import statements and are not counted:

* the backbone families, which `vptpc.models.registry` loads by name from
  `registry.FAMILIES` (plugins: a family depends on the library, as a
  family from another package would, and nothing imports a family module);
* `vptpc.moved.forwarder`, a module's ``__getattr__`` for names that moved:
  it loads the new home by name, and only when an old spelling is used.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "vptpc"

# Packages a function may import when it needs them: optional extras, or
# imports that cost about a second and that most runs never need.
DEFERRED_OK = (
  "jax2onnx",
  "matplotlib",
  "onnx",
  "onnxruntime",
  "orbax.checkpoint._src",  # private: only when a fault is armed
  "sklearn",
  "tensorflow",
  "tensorflow_datasets",
  "torch",
)
# The command line defers JAX and the library until its flags parse.
DEFERS_EVERYTHING = ("vptpc.main",)
# Modules at the bottom of the run lifecycle, and all they may import.
LOW_LEVEL = {
  "vptpc.moved": set(),
  "vptpc.records": set(),
  "vptpc.protocol_runs": set(),
  "vptpc.rundir": {"vptpc.config_util", "vptpc.moved", "vptpc.records"},
  "vptpc.stops": set(),
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PKG.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _target(name: str) -> str | None:
  """The vptpc module an imported name lives in (None: outside vptpc)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


@functools.cache
def _tree(module: str) -> ast.Module:
  return ast.parse(MODULES[module].read_text())


def _imports(module: str):
  """(node, imported module names, inside a function?) of every import."""
  path = MODULES[module]
  tree = _tree(module)
  is_pkg = path.name == "__init__.py"

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
        if in_function is None and child.name == "__getattr__":
          continue
        yield from visit(child, child)
      elif isinstance(child, ast.Import):
        yield child, [a.name for a in child.names], in_function
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          here = module.split(".") if is_pkg else module.split(".")[:-1]
          here = here[: len(here) - child.level + 1]
          base = ".".join(here + ([base] if base else []))
        # ``from vptpc.data import pipeline`` imports the module; ``from
        # vptpc.models import VisionTransformer`` the package's name.
        names = [
          f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
          for a in child.names
        ]
        yield child, names, in_function
      else:
        yield from visit(child, in_function)

  yield from visit(tree, None)


@functools.cache
def _graph() -> dict[str, set[str]]:
  graph = {m: set() for m in MODULES}
  for m in MODULES:
    for _, names, _ in _imports(m):
      for name in names:
        t = _target(name)
        if t and t != m:
          graph[m].add(t)
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a path (first == last), or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(v):
    state[v] = 1
    stack.append(v)
    for w in sorted(graph[v]):
      if state.get(w) == 1:
        return stack[stack.index(w) :] + [w]
      if w not in state:
        found = dfs(w)
        if found:
          return found
    stack.pop()
    state[v] = 2
    return None

  for v in sorted(graph):
    if v not in state:
      found = dfs(v)
      if found:
        return found
  return None


def test_the_package_has_no_import_cycle():
  graph = _graph()
  assert len(graph) > 40 and sum(map(len, graph.values())) > 100
  cycle = _cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycle(graph) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_functions_import_only_optional_or_heavy_packages_and_say_why():
  bad = []
  for m, path in MODULES.items():
    lines = path.read_text().splitlines()
    for node, names, fn in _imports(m):
      if fn is None or m in DEFERS_EVERYTHING:
        continue
      name = names[0]
      allowed = any(
        name == ok or name.startswith(ok + ".") for ok in DEFERRED_OK
      )
      said = any("#" in ln for ln in lines[fn.lineno - 1 : node.end_lineno])
      if not allowed or not said:
        why = "not optional or heavy" if not allowed else "no comment why"
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} ({why})")
  assert not bad, "imports inside functions:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(LOW_LEVEL))
def test_low_level_modules_import_nothing_above_them(module):
  assert _graph()[module] <= LOW_LEVEL[module]


def test_train_re_exports_nothing():
  tree = ast.parse(MODULES["vptpc.train"].read_text())
  assigned = {
    t.id
    for node in tree.body
    if isinstance(node, ast.Assign)
    for t in node.targets
    if isinstance(t, ast.Name)
  }
  assert "__all__" not in assigned
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
      "vptpc"
    ):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        # A class or function imported by name would be importable from
        # train as well; train imports modules (MetricWriter aside).
        assert full in MODULES or a.name == "MetricWriter", full


def test_no_module_outside_models_is_much_over_700_lines():
  long = {
    str(path.relative_to(ROOT)): n
    for m, path in MODULES.items()
    if not m.startswith("vptpc.models")
    and (n := len(path.read_text().splitlines())) > 760
  }
  assert not long, f"split these along a seam: {long}"


@pytest.mark.parametrize(
  "old,new",
  [
    ("vptpc.train.setup", "vptpc.build.setup"),
    ("vptpc.train.Runner", "vptpc.runner.Runner"),
    ("vptpc.train.TrainState", "vptpc.steps.TrainState"),
    ("vptpc.train.versions", "vptpc.records.versions"),
    ("vptpc.rundir.entry", "vptpc.lifecycle.entry"),
    ("vptpc.rundir.local_workdir", "vptpc.lifecycle.local_workdir"),
  ],
)
def test_a_moved_name_still_answers_and_names_its_new_home(old, new):
  import importlib

  old_mod, _, name = old.rpartition(".")
  new_mod = new.rpartition(".")[0]
  with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
    got = getattr(importlib.import_module(old_mod), name)
  assert got is getattr(importlib.import_module(new_mod), name)
  with pytest.raises(AttributeError, match="no_such_name"):
    _ = importlib.import_module(old_mod).no_such_name
