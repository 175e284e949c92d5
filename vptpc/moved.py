"""Names that moved to the module that owns them, still answering where they were.

A module whose public names moved keeps a table ``{name: new home}`` and
sets ``__getattr__ = moved.forwarder(__name__, table)``: the old spelling
then returns the same object with a DeprecationWarning that names the new
one. The new home is loaded by name only when an old spelling is used, so a
low module may forward to one above it without importing it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def forwarder(
  module: str, table: Mapping[str, str | ModuleType]
) -> Callable[[str], Any]:
  """A module-level ``__getattr__`` for ``module``'s moved names.

  Args:
    module: the old module's name (its ``__name__``).
    table: each moved name -> its new module, as a module or its name.

  Returns:
    The function to assign to the old module's ``__getattr__``; any other
    name raises AttributeError as usual.
  """

  def __getattr__(name: str) -> Any:
    if name not in table:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home = table[name]
    where = home if isinstance(home, str) else home.__name__
    warnings.warn(
      f"{module}.{name} is deprecated: use {where}.{name}.",
      DeprecationWarning,
      stacklevel=2,
    )
    if isinstance(home, str):
      home = importlib.import_module(home)
    return getattr(home, name)

  return __getattr__
