"""dicomnode.compat: each patch of a library's internals checks the pinned release at import."""

from __future__ import annotations

import ast
import importlib
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import dicomnode
from dicomnode.compat import IncompatibleLibrary, require

COMPAT = Path(dicomnode.__file__).parent / "compat"
PYPROJECT = Path(dicomnode.__file__).parent.parent / "pyproject.toml"


def _pins() -> dict[str, tuple[str, str]]:
    """compat module -> the (package, pinned) of its ``require`` call at import."""
    out: dict[str, tuple[str, str]] = {}
    for p in sorted(COMPAT.glob("*.py")):
        if p.name == "__init__.py":
            continue
        body = ast.parse(p.read_text()).body
        constants = {t.id: n.value for n in body if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name)}
        calls = [n.value for n in body
                 if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                 and ast.unparse(n.value.func).split(".")[-1] == "require"]
        assert len(calls) == 1, f"{p.name}: one require(package, pinned) at module level"
        package, pinned = (
            ast.literal_eval(constants.get(a.id, a) if isinstance(a, ast.Name) else a)
            for a in calls[0].args)
        out[p.stem] = (package, pinned)
    return out


def _fake_version(monkeypatch: pytest.MonkeyPatch, found: str | None) -> None:
    def version(package: str) -> str:
        if found is None:
            raise metadata.PackageNotFoundError(package)
        return found
    monkeypatch.setattr(metadata, "version", version)


@pytest.mark.parametrize(("pinned", "found"), [
    ("3.0.2", "3.0.3"), ("3.0.2", "3.0.20"), ("0.28.2", "0.29.0"), ("2.1.", "2.2.0"),
    ("2.1.", "2.10.1"), ("2.1.", "2.0.9"),
])
def test_require_fails_in_one_line_naming_package_found_and_pinned(
        monkeypatch: pytest.MonkeyPatch, pinned: str, found: str) -> None:
    _fake_version(monkeypatch, found)
    with pytest.raises(IncompatibleLibrary) as info:
        require("somelib", pinned)
    message = str(info.value)
    assert "\n" not in message
    assert f"somelib {found} is installed" in message
    assert f"somelib {pinned.rstrip('.')}" in message


def test_require_fails_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_version(monkeypatch, None)
    with pytest.raises(IncompatibleLibrary, match="somelib not installed is installed"):
        require("somelib", "1.0")


@pytest.mark.parametrize(("pinned", "found"), [("3.0.2", "3.0.2"), ("2.1.", "2.1.0"),
                                               ("2.1.", "2.1.9")])
def test_require_accepts_the_pin(monkeypatch: pytest.MonkeyPatch, pinned: str,
                                 found: str) -> None:
    _fake_version(monkeypatch, found)
    require("somelib", pinned)


def test_every_compat_module_imports_on_the_installed_pins() -> None:
    pins = _pins()
    assert {"highdicom", "pydicom", "sqlalchemy"} <= set(pins)
    for module, (package, pinned) in pins.items():
        require(package, pinned)
        importlib.import_module(f"dicomnode.compat.{module}")


def test_compat_pins_match_pyproject() -> None:
    """A pin moved in pyproject.toml without porting the patch fails here, not in a job."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    reqs = {(r := Requirement(d)).name.lower(): r.specifier for d in deps}
    for module, (package, pinned) in _pins().items():
        spec = reqs.get(package.lower())
        assert spec is not None, f"compat/{module}.py patches {package}, not a dependency"
        if pinned.endswith("."):  # a release series: all of it allowed, nothing else
            base = Version(pinned + "0")
            nxt = Version(f"{base.major}.{base.minor + 1}.0")
            assert spec.contains(base) and spec.contains(pinned + "99"), (module, spec)
            assert not spec.contains(nxt), (module, spec)
            assert not spec.contains(f"{base.major}.{base.minor - 1}.99"), (module, spec)
        else:
            assert str(spec) == f"=={pinned}", (module, spec)
