"""docs/configuration.md is generated from the settings model and must stay so."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal

from dicomnode import config, config_docs
from dicomnode.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _section_classes() -> list[type]:
    """Every dataclass reachable from Settings (sections and list entries)."""
    hints = typing.get_type_hints(Settings)
    out: list[type] = []
    for f in dataclasses.fields(Settings):
        tp: Any = hints[f.name]
        if typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.append(tp)
    return out


def test_configuration_md_is_current() -> None:
    assert DOC.is_file(), f"docs/configuration.md is missing: run `{config_docs.REGENERATE}`"
    assert DOC.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/configuration.md differs from the settings model (dicomnode/config.py): "
        f"regenerate it with `{config_docs.REGENERATE}`")


def test_every_setting_has_a_description() -> None:
    missing = [f"{cls.__name__}.{f.name}"
               for cls in [Settings, *_section_classes()]
               for f in dataclasses.fields(cls)
               if not config_docs.field_doc(cls, f.name).strip()]
    assert not missing, ("settings without a docstring under their field in "
                         f"dicomnode/config.py: {missing}")
    undocumented = [cls.__name__ for cls in _section_classes() if not cls.__doc__]
    assert not undocumented, f"settings classes without a docstring: {undocumented}"


def _validated_fields(cls: type) -> set[str]:
    """Field names that ``cls.validate`` names in its error messages."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.validate)))  # type: ignore[attr-defined]
    names: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        first = node.args[0]
        text = ""
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            text = first.value
        elif isinstance(first, ast.JoinedStr):
            text = next((v.value for v in first.values
                         if isinstance(v, ast.Constant) and isinstance(v.value, str)), "")
        m = re.match(r"\.?(?:[a-z_]+\.)?([a-z_]+)", text)
        if m:
            names.add(m.group(1))
    return names & {f.name for f in dataclasses.fields(cls)}


def test_every_validated_setting_says_what_is_allowed() -> None:
    lacking = []
    for cls in _section_classes():
        hints = typing.get_type_hints(cls)
        checked = _validated_fields(cls)
        for name in sorted(checked):
            if typing.get_origin(hints[name]) is Literal:
                continue
            if "Allowed:" not in config_docs.field_doc(cls, name):
                lacking.append(f"{cls.__name__}.{name}")
    assert not lacking, ("validate() restricts these settings but their docstring has no "
                         f"'Allowed: ...' sentence: {lacking}")


def test_validated_fields_are_found() -> None:
    # The check above is only worth something if the walker sees validate()'s keys.
    assert _validated_fields(config.NodeConfig) >= {"ae_title", "port", "max_pdu", "receivers",
                                                    "allowed_calling_aets",
                                                    "max_associations"}
    assert _validated_fields(config.DestinationConfig) == {"ae_title", "host", "port", "formats",
                                                           "url", "auth", "timeout_seconds"}


def test_render_lists_every_key_with_its_environment_variable() -> None:
    text = config_docs.render()
    for f in dataclasses.fields(config.WorkerConfig):
        assert f"`worker.{f.name}`" in text
        assert f"`DICOMNODE_WORKER__{f.name.upper()}`" in text
    assert "`destinations[].ae_title`" in text
    assert "source" not in {k.key for _, _, ks in config_docs.sections() for k in ks}
    assert "| `node.port` | integer | `11112` | 1-65535 |" in text


def test_docs_name_only_settings_that_exist() -> None:
    # `node.port`, `worker.backoff_*` ... in README.md and docs/*.md must be real keys.
    root = DOC.parents[1]
    hints = typing.get_type_hints(Settings)
    sections = {name: {f.name for f in dataclasses.fields(tp)} for name, tp in hints.items()
                if isinstance(tp, type) and dataclasses.is_dataclass(tp)}
    pattern = re.compile(r"`(" + "|".join(sections) + r")\.([a-z_]+)(\*?)")
    unknown = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for m in pattern.finditer(page.read_text(encoding="utf-8")):
            section, key, star = m.groups()
            # a file name: `worker.py`, `node.yaml`, `audit.jsonl`
            if key in ("py", "yaml", "md", "json", "jsonl"):
                continue
            known = sections[section]
            if not (any(k.startswith(key) for k in known) if star else key in known):
                unknown.append(f"{page.relative_to(root)}: {m.group(0)}`")
    assert not unknown, f"the docs name settings that do not exist: {unknown}"
