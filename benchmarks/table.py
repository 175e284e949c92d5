"""Prints benchmark rows as a Markdown table (and JSON lines on request)."""

from __future__ import annotations

import json


def print_rows(rows: list[dict], as_json: bool = False) -> None:
  """Prints ``rows`` (dicts with the same keys) as a Markdown table."""
  cols = list(rows[0])
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join(str(r[c]) for c in cols) + " |")
  if as_json:
    for r in rows:
      print(json.dumps(r))
