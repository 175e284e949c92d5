"""Sphinx configuration: MyST pages and an API reference from docstrings.

Build (offline; CI runs it with warnings as errors)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gen_config_reference  # noqa: E402

project = "vptpc"
author = "the vptpc authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as fields of their class, not objects of their own (a Flax
# module's fields would otherwise be described twice).
napoleon_use_ivar = True
myst_heading_anchors = 3
# `backticks` in docstrings name code, as in the flax and optax docs.
default_role = "code"


def _config_reference(app):
  """Regenerates configuration.md so the built page matches the configs."""
  gen_config_reference.main([])


def setup(app):
  """Sphinx hook."""
  app.connect("builder-inited", _config_reference)
