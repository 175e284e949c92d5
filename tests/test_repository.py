"""The repository speaks of vptpc and its users, and its citations resolve.

Every tracked (or new, unignored) text file but this one, which names the
patterns: no path outside the repository, no citation of notes that are not
in it, no development history (issue numbers, past work); git history keeps
the past. Every citation of ``docs/references.md`` names a section that
exists there.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCES = os.path.join(ROOT, "docs", "references.md")
BINARY = (".npz", ".safetensors", ".gz", ".png", ".jpg", ".tgz", ".zip")

# Each pattern, and what it finds.
FORBIDDEN = {
  r"\.\./shared\b|\bshared/refer": "a path outside the repository",
  r"(?<![\w/.-])(?:vpt|pc|vtab|environment|pretraining|style)\.md\b": (
    "a citation of notes outside the repository (cite docs/references.md)"
  ),
  r"(?i)\bissues?\s+#?\d+": "an issue number (development history)",
  r"(?i)\bsessions?(?:'s)?\b": "a work session (development history)",
}
# Lines where "session" means what a library means by it.
SESSION_OK = re.compile(
  r"test session|scope=\"session\"|onnxruntime|InferenceSession", re.I
)


def _tracked_texts() -> dict[str, str]:
  try:
    out = subprocess.run(
      # Tracked files, and new ones not yet added (not the ignored).
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      check=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  texts = {}
  for name in out.decode().split("\0"):
    path = os.path.join(ROOT, name)
    if not name or name.endswith(BINARY) or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      data = f.read()
    if b"\0" not in data:
      texts[name] = data.decode("utf-8", errors="replace")
  return texts


def test_no_outside_paths_or_development_history():
  problems = []
  for name, text in _tracked_texts().items():
    if name == "tests/test_repository.py":
      continue
    for n, line in enumerate(text.splitlines(), 1):
      for pattern, what in FORBIDDEN.items():
        m = re.search(pattern, line)
        if not m or ("session" in what and SESSION_OK.search(line)):
          continue
        problems.append(f"{name}:{n}: {what}: {m.group(0)!r}")
  assert not problems, "\n".join(problems)


def _slug(title: str) -> str:
  """MyST's heading anchor (``myst_heading_anchors``)."""
  return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _sections() -> set[str]:
  with open(REFERENCES) as f:
    return {
      m.group(1).strip() for m in re.finditer(r"(?m)^#{1,3} (.+)$", f.read())
    }


def test_references_citations_name_existing_sections():
  sections = _sections()
  anchors = {_slug(s) for s in sections}
  assert {"vpt-prompt-initialisation", "pc-reconstruction"} <= anchors
  bad, cited = [], 0
  for name, text in _tracked_texts().items():
    for m in re.finditer(r"references\.md#([\w-]+)", text):
      cited += 1
      if m.group(1) not in anchors:
        bad.append(f"{name}: no section for #{m.group(1)}")
    for m in re.finditer(r'references\.md,[\s#*>]*"([^"]+)"', text):
      cited += 1
      # A title may wrap over comment lines: drop the comment markers.
      title = " ".join(w for w in m.group(1).split() if w not in "#*>")
      if title not in sections:
        bad.append(f'{name}: no section "{title}"')
  assert not bad, "\n".join(bad)
  assert cited >= 20  # the code cites it; this test must see them
