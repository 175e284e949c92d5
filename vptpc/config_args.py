"""Typed parsing of the single config-string argument of ``get_config``.

``get_config("task=dtd,num_prompts=50,smoke")`` lets one config file serve
every task and variant (docs/references.md, "Design conventions"). The
string is parsed against a spec of keys with typed defaults, so a typo or a
badly typed value fails at start-up rather than silently training the wrong
model.
"""

from __future__ import annotations

from typing import Any

import ml_collections

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _type_name(default: Any) -> str:
  """Describes the type expected for a key, for error messages."""
  if default is None:
    return "str"
  if isinstance(default, tuple):
    elem = type(default[0]).__name__ if default else "str"
    return f"tuple of {elem} (colon-separated, e.g. a:b:c)"
  return type(default).__name__


def _convert_scalar(text: str, default: Any) -> Any:
  """Converts `text` to the type of `default`, raising ValueError if it fails.

  Args:
    text: The value as written in the config string.
    default: A default whose type selects the conversion; None means str.

  Returns:
    The converted value.

  Raises:
    ValueError: If `text` is not a valid literal of the type.
  """
  # bool first: it is a subclass of int.
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in _TRUE:
      return True
    if lowered in _FALSE:
      return False
    raise ValueError(f"use one of {', '.join(_TRUE + _FALSE)}")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError("not an integer literal") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError("not a float literal") from None
  if default is None or isinstance(default, str):
    return text
  raise TypeError(f"unsupported default type {type(default).__name__}")


def _convert(key: str, text: str, default: Any) -> Any:
  """Converts the value of `key`, wrapping failures in a uniform message."""
  try:
    if isinstance(default, tuple):
      elem = default[0] if default else ""
      if not text:
        return ()
      out = []
      for t in text.split(":"):
        try:
          out.append(_convert_scalar(t.strip(), elem))
        except ValueError as e:
          raise ValueError(f"element {t.strip()!r}: {e}") from None
      return tuple(out)
    return _convert_scalar(text, default)
  except ValueError as e:
    raise ValueError(
      f"Bad value {text!r} for config key {key!r}: expected "
      f"{_type_name(default)} ({e})."
    ) from None


def _check_spec(spec: dict[str, Any]) -> None:
  """Raises TypeError for defaults whose type `parse_arg` cannot parse."""
  scalar = (bool, int, float, str, type(None))
  for key, default in spec.items():
    if isinstance(default, tuple):
      bad = [x for x in default if not isinstance(x, (bool, int, float, str))]
    else:
      bad = [] if isinstance(default, scalar) else [default]
    if bad:
      raise TypeError(
        f"Default for config key {key!r} must be a bool, int, float, str, "
        f"None or a tuple of one of the first four; got {default!r}."
      )


def _guess(text: str) -> Any:
  """Infers int, float, bool or str for a key missing from the spec."""
  # Without a digit, words such as "nan" or "inf" stay strings.
  if not any(c.isdigit() for c in text):
    lowered = text.lower()
    return lowered == "true" if lowered in ("true", "false") else text
  for convert in (int, float):
    try:
      return convert(text)
    except ValueError:
      pass
  return text


def parse_arg(
  arg: str | None, *, lazy: bool = False, **spec: Any
) -> ml_collections.ConfigDict:
  """Parses a ``key=value,key,...`` config string against typed defaults.

  Example::

    parse_arg("task=dtd,num_prompts=50,smoke,counts=1:2:3",
              task="cifar100", num_prompts=10, smoke=False, counts=(1,))
    # -> task="dtd", num_prompts=50, smoke=True, counts=(1, 2, 3)

  Items are separated by commas, and whitespace around items, keys and values
  is ignored (empty items too, e.g. a trailing comma). Each value is converted
  with the type of its default:

  * ``bool``: ``true/false/1/0/yes/no`` in any case; a bare ``key`` means
    True and is only allowed for bool keys.
  * ``int``, ``float``, ``str``: the usual literals; ``1.5`` is not an int.
  * ``None``: the value is kept as a str.
  * ``tuple``: colon-separated elements (commas separate items), each
    converted like the default's first element, or kept as str when the
    default is empty. An empty value gives an empty tuple.

  Args:
    arg: The config string; None or empty returns the defaults.
    lazy: If True, keys missing from `spec` are accepted, with an int, float,
      bool (``true``/``false``) or str value inferred from the text (a bare key
      gives True). If False, such keys raise.
    **spec: Every accepted key with its typed default.

  Returns:
    An unlocked ConfigDict holding every key of `spec`, overridden by `arg`,
    plus any extra keys allowed by `lazy`.

  Raises:
    ValueError: On an unknown key (listing the valid ones), a badly typed
      value (naming key, value and expected type), a bare non-bool key, an
      empty key or a duplicate key.
    TypeError: If a default in `spec` has an unsupported type.
  """
  _check_spec(spec)
  values = dict(spec)
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not key:
      raise ValueError(f"Empty key in config item {item!r} of {arg!r}.")
    if key in seen:
      raise ValueError(f"Duplicate config key {key!r} in {arg!r}.")
    seen.add(key)
    if key not in spec:
      if not lazy:
        raise ValueError(
          f"Unknown config key {key!r} in {arg!r}; valid keys: "
          f"{', '.join(sorted(spec)) or '(none)'}."
        )
      values[key] = _guess(text) if has_value else True
      continue
    default = spec[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(
          f"Config key {key!r} needs a value ({key}=...): a bare key is only "
          f"allowed for bool keys, and {key!r} expects "
          f"{_type_name(default)}."
        )
      values[key] = True
      continue
    values[key] = _convert(key, text, default)
  return ml_collections.ConfigDict(values)
