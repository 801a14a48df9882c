"""The configuration reference (``docs/configuration.md``), generated from the settings model.

Each setting's description is the attribute docstring under its field in
:mod:`dicomnode.config`; a sentence starting ``Allowed:`` at its end names the values
``validate()`` accepts. Types and defaults come from the dataclasses themselves, so the
reference cannot drift from the code: ``tests/unit/test_config_docs.py`` fails when the
committed file differs from :func:`render`. Regenerate it with::

    python -m dicomnode.config_docs > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dicomnode import config
from dicomnode.config import ENV_PREFIX, Settings

REGENERATE = "python -m dicomnode.config_docs > docs/configuration.md"

#: Fields of :class:`Settings` that are not configuration keys.
INTERNAL = frozenset({"source"})


@dataclass(frozen=True)
class Key:
    """One documented setting."""

    key: str  # "node.port", "destinations[].name", "routes"
    type: str
    default: str
    allowed: str
    env: str
    description: str


@functools.cache
def _docstrings() -> dict[str, dict[str, str]]:
    """Attribute docstrings per class of :mod:`dicomnode.config`: ``{class: {field: doc}}``."""
    tree = ast.parse(Path(inspect.getfile(config)).read_text(encoding="utf-8"))
    out: dict[str, dict[str, str]] = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        for stmt, nxt in zip(cls.body, cls.body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
        out[cls.name] = docs
    return out


def field_doc(cls: type, name: str) -> str:
    """The docstring written under field ``name`` of ``cls`` ("" when there is none)."""
    return _docstrings().get(cls.__name__, {}).get(name, "")


def _markdown(text: str) -> str:
    """A docstring as one line of Markdown fit for a table cell."""
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def _split_allowed(doc: str) -> tuple[str, str]:
    description, sep, allowed = doc.partition("Allowed:")
    return _markdown(description), _markdown(allowed).rstrip(".") if sep else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or empty"
    if origin is Literal:
        return "string"
    if origin is tuple:
        item = args[0]
        if dataclasses.is_dataclass(item):
            return "list of mappings"
        if typing.get_origin(item) is not None and issubclass(typing.get_origin(item),
                                                              typing.Mapping):
            return "list of mappings"
        return f"list of {_type_name(item)}s"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, Path):
        s = str(v)
        return s if v.is_absolute() or s.startswith(".") else f"./{s}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return v if v else '""'
    return str(v)


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_value(f.default_factory())}`"
    return "required"


def keys(cls: type, prefix: str, env_prefix: str | None) -> list[Key]:
    """The documented keys of one section class; ``env_prefix`` None: no variable per key."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        description, allowed = _split_allowed(field_doc(cls, f.name))
        if typing.get_origin(tp) is Literal:
            choices = ", ".join(f"`{a}`" for a in typing.get_args(tp))
            allowed = f"{choices}; {allowed}" if allowed else choices
        env = f"`{env_prefix}{f.name.upper()}`" if env_prefix is not None else "-"
        out.append(Key(f"{prefix}{f.name}", _type_name(tp), _default(f), allowed, env,
                       description))
    return out


def sections() -> list[tuple[str, str, list[Key]]]:
    """``(heading, introduction, keys)`` for every top-level key of :class:`Settings`."""
    hints = typing.get_type_hints(Settings)
    out = []
    for f in dataclasses.fields(Settings):
        if f.name in INTERNAL:
            continue
        tp = hints[f.name]
        env = f"{ENV_PREFIX}{f.name.upper()}"
        intro = _markdown(field_doc(Settings, f.name))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            intro = _markdown(inspect.getdoc(tp) or intro)
            out.append((f"`{f.name}`", intro, keys(tp, f"{f.name}.", f"{env}__")))
            continue
        item = typing.get_args(tp)[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            intro = _markdown(inspect.getdoc(item) or intro)
            intro += (f" A list: each entry a mapping with the keys below. The environment "
                      f"variable `{env}` replaces the whole list (a YAML list of mappings).")
            out.append((f"`{f.name}[]`", intro, keys(item, f"{f.name}[].", None)))
        else:
            whole = Key(f.name, _type_name(tp), _default(f), "", f"`{env}`", intro)
            out.append((f"`{f.name}`", intro, [whole]))
    return out


_HEADER = f"""\
# Configuration reference

<!-- Generated from dicomnode/config.py by `{REGENERATE}`.
     Edit the docstrings there, not this file: a test fails when the two differ. -->

The node reads one YAML file, named by `--config` (`-c`) before or after the command
(`dicomnode --config node.yaml serve`, `dicomnode serve --config node.yaml`), else by
`$DICOMNODE_CONFIG`; with no file it runs on the defaults below. Every command
(`serve`, `worker`, `jobs`, `routes` ...) reads the same settings.

Every key can be overridden by an environment variable
`DICOMNODE_<SECTION>__<KEY>` (upper case, a double underscore between the parts),
which wins over the file. Values are read as YAML scalars or lists, so numbers,
booleans and lists work:

```sh
DICOMNODE_NODE__PORT=11113 DICOMNODE_NODE__ALLOWED_CALLING_AETS='[ORTHANC, CT_SCANNER_1]' \\
    dicomnode serve
```

Precedence, highest first: environment variables, the YAML file, the defaults.
Settings are validated at start; an error names the key and the problem and exits
with code 2, e.g. `dicomnode: error: node.port: 70000 is not a TCP port (1-65535)`.
An unknown key is an error too (it names the keys that exist).

Types: *string*, *integer*, *number* (integer or decimal), *boolean* (`true` /
`false`; `yes` / `no`, `on` / `off` and `1` / `0` are accepted too), *path*
(relative to the working directory), *list* (a YAML list; in an environment
variable also a comma-separated string).
"""


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    parts = [_HEADER]
    for heading, intro, ks in sections():
        parts.append(f"\n## {heading}\n\n{intro}\n")
        if len(ks) == 1 and "." not in ks[0].key and "[]" not in ks[0].key:
            k = ks[0]
            parts.append(f"\nType: {k.type}. Default: {k.default}. "
                         f"Environment variable: {k.env}.\n")
            continue
        parts.append("\n| key | type | default | allowed | environment variable | meaning |\n"
                     "|-----|------|---------|---------|----------------------|---------|\n")
        for k in ks:
            parts.append(f"| `{k.key}` | {k.type} | {k.default} | {k.allowed or '-'} | "
                         f"{k.env} | {k.description} |\n")
    return "".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
