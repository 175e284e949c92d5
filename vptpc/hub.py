"""timm backbone weights by hub name, fetched once and read from the cache.

timm publishes each pretrained backbone as ``model.safetensors`` in the
Hugging Face repo ``timm/<name>``, where ``<name>`` carries the pretrained
tag: ``vit_base_patch16_224.augreg_in21k``,
``vit_base_patch14_dinov2.lvd142m``. Weights are downloaded only by
``python -m vptpc.prepare --weights=timm/<name>`` (`fetch_weights`), into
the standard Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``~/.cache/huggingface/hub``), which other Hugging Face tools share.
Training only looks there (`resolve_weights`) and never reaches the network.

``huggingface_hub`` reads its environment variables once, at import; this
module reads ``HF_HUB_CACHE``/``HF_HOME``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` at each call and passes them on, so a variable set later
in the process still counts.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

from huggingface_hub import hf_hub_download, try_to_load_from_cache

WEIGHTS_FILE = "model.safetensors"

_ORG = "timm"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(ValueError):
  """A hub name that cannot be used, or weights that cannot be fetched."""


class WeightsNotCached(HubError):
  """The weights are not in the local cache; `python -m vptpc.prepare`."""


def hub_cache_dir() -> str:
  """The Hugging Face hub cache directory, from the environment now.

  The same rule as ``huggingface_hub.constants.HF_HUB_CACHE``, which is
  fixed when that module is imported: ``HF_HUB_CACHE``, else the legacy
  ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

  Returns:
    The directory (which need not exist yet).
  """
  env = os.environ
  home = env.get("HF_HOME") or os.path.join(
    env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
  )
  home = os.path.expandvars(os.path.expanduser(home))
  path = (
    env.get("HF_HUB_CACHE")
    or env.get("HUGGINGFACE_HUB_CACHE")
    or os.path.join(home, "hub")
  )
  return os.path.expandvars(os.path.expanduser(path))


def _offline() -> bool:
  """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now."""
  v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
  return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _bare(name: str) -> str:
  """``name`` without a leading ``timm/``."""
  return name.strip().removeprefix(f"{_ORG}/")


def repo_id(name: str, known: Sequence[str] | None = None) -> str:
  """The hub repo of a timm backbone name.

  Args:
    name: ``<name>`` or ``timm/<name>``, with a pretrained tag, e.g.
      ``vit_base_patch14_dinov2.lvd142m``.
    known: If given, the accepted names (with or without ``timm/``).

  Returns:
    ``timm/<name>``.

  Raises:
    HubError: (a ValueError) the name has no pretrained tag, names another
      organisation, or is not in ``known``.
  """
  bare = _bare(name)
  if not bare or "/" in bare:
    raise HubError(
      f"{name!r} is not a timm weights name: expected <name> or "
      f"timm/<name>, e.g. timm/vit_base_patch16_224.augreg_in21k."
    )
  if "." not in bare or bare.startswith(".") or bare.endswith("."):
    raise HubError(
      f"{name!r} has no pretrained tag: timm weights are named with one, "
      f"e.g. {bare.strip('.') or 'vit_base_patch14_dinov2'}.lvd142m."
    )
  if known is not None:
    names = [_bare(k) for k in known]
    if bare not in names:
      raise HubError(
        f"{name!r} is not a known timm weights name; known: "
        f"{', '.join(names) or '(none)'}."
      )
  return f"{_ORG}/{bare}"


def cached_weights(name: str) -> str | None:
  """The cached ``model.safetensors`` of ``timm/<name>``; never networks.

  Args:
    name: ``<name>`` or ``timm/<name>`` (see `repo_id`).

  Returns:
    The file's path in the hub cache (`hub_cache_dir`, at the revision
    ``main`` points to), or None if it is not there.
  """
  path = try_to_load_from_cache(
    repo_id(name), WEIGHTS_FILE, cache_dir=hub_cache_dir()
  )
  return path if isinstance(path, str) else None


def _one_line(e: BaseException) -> str:
  """``Type: message`` on one line, followed by its causes'."""
  parts, seen = [], set()
  while e is not None and id(e) not in seen and len(parts) < 3:
    seen.add(id(e))
    text = " ".join(s.strip() for s in str(e).splitlines() if s.strip())
    part = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if part not in parts:
      parts.append(part)
    e = e.__cause__
  out = " <- ".join(parts)
  return out if len(out) <= 400 else out[:397] + "..."


def _check_sha256(path: str, repo: str) -> None:
  """Checks a downloaded blob against its LFS sha256 (its blob name).

  The hub library names an LFS blob by the sha256 the hub reported
  (``X-Linked-Etag``) but, downloading over plain HTTP, checks only its
  size. A mismatching blob is removed, so the next fetch downloads again.
  """
  blob = os.path.realpath(path)
  want = os.path.basename(blob)
  if not _SHA256.fullmatch(want):
    return  # not an LFS sha256 (e.g. a copy where symlinks are unsupported)
  h = hashlib.sha256()
  with open(blob, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  if h.hexdigest() != want:
    for p in (path, blob):
      try:
        os.remove(p)
      except OSError:
        pass
    raise HubError(
      f"{repo}/{WEIGHTS_FILE}: sha256 {h.hexdigest()} of the download is not "
      f"the hub's {want}; removed it, fetch again."
    )


def fetch_weights(name: str, known: Sequence[str] | None = None) -> str:
  """Downloads ``model.safetensors`` of ``timm/<name>`` into the hub cache.

  Goes through ``huggingface_hub.hf_hub_download`` (cached by commit, so a
  file already there is not downloaded again), then checks the file's sha256
  against the one the hub reported. With ``HF_HUB_OFFLINE`` set, only the
  cache is looked at.

  Args:
    name: ``<name>`` or ``timm/<name>`` (see `repo_id`).
    known: If given, the accepted names (see `repo_id`).

  Returns:
    The local path of the file.

  Raises:
    HubError: a bad name, or a failed download; the message is one line
      naming the repo and the cause.
  """
  repo = repo_id(name, known)
  cache = hub_cache_dir()
  if _offline():
    path = cached_weights(repo)
    if path is None:
      raise HubError(
        f"could not fetch {repo}/{WEIGHTS_FILE}: HF_HUB_OFFLINE is set and "
        f"it is not in {cache}."
      )
    return path

  try:
    path = hf_hub_download(
      repo,
      WEIGHTS_FILE,
      cache_dir=cache,
      endpoint=os.environ.get("HF_ENDPOINT", "").rstrip("/") or None,
    )
  except Exception as e:  # offline, 404, 401, disk, ...: many types.
    raise HubError(
      f"could not fetch {repo}/{WEIGHTS_FILE}: {_one_line(e)}"
    ) from e
  _check_sha256(path, repo)
  return path


def resolve_weights(name: str, prepare_cmd_known: bool = True) -> str:
  """The cached ``model.safetensors`` of ``timm/<name>``, or an error.

  Never touches the network: run time reads what
  ``python -m vptpc.prepare --weights=...`` fetched.

  Args:
    name: ``<name>`` or ``timm/<name>`` (see `repo_id`).
    prepare_cmd_known: Whether the error names the prepare command (False:
      it names `fetch_weights`, for callers outside the command line).

  Returns:
    The local path of the file.

  Raises:
    WeightsNotCached: (a HubError) it is not in the cache; the message is
      one line naming the cache directory and how to fetch it.
    HubError: the name is bad (see `repo_id`).
  """
  repo = repo_id(name)
  path = cached_weights(repo)
  if path is not None:
    return path
  how = (
    f"run: python -m vptpc.prepare --weights={repo}"
    if prepare_cmd_known
    else f"call: vptpc.hub.fetch_weights({repo!r})"
  )
  raise WeightsNotCached(
    f"no cached weights for {repo} in {hub_cache_dir()}; {how}"
  )


# How a config names weights in the hub cache instead of a local file (the
# scheme timm uses for hub models): ``hf-hub:timm/<name>``.
HUB_SCHEME = "hf-hub:"


def hub_ref(name: str) -> str:
  """The ``config.model.checkpoint_path`` value for timm weights by name."""
  return HUB_SCHEME + repo_id(name)


def is_hub_ref(path: str) -> bool:
  """Whether a checkpoint path names hub weights (`hub_ref`)."""
  return str(path).startswith(HUB_SCHEME)


def local_path(path: str) -> str:
  """A checkpoint path with a hub reference replaced by the cached file.

  Raises:
    WeightsNotCached: a hub reference whose weights are not cached (one
      line naming the prepare command).
  """
  if not is_hub_ref(path):
    return path
  return resolve_weights(str(path)[len(HUB_SCHEME) :])
