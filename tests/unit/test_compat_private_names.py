"""No module outside dicomnode/compat/ touches a private name of pynetdicom, highdicom,
pydicom or SQLAlchemy.

The check walks the AST of every ``dicomnode/**/*.py`` outside ``dicomnode/compat/`` and
reports:

* an import of a private module or name from those packages
  (``from pydicom.filewriter import _is_multi_value``, ``from pynetdicom import _config``,
  ``import highdicom._standard_utils``);
* an access ``x._name`` (also ``getattr(x, "_name")`` and friends) where ``x`` comes from
  those packages: a name bound by importing from them, or a variable annotated with or
  assigned from such a name;
* conservatively, any other ``x._name`` where ``_name`` is defined nowhere in dicomnode
  (functions, classes, parameters, assigned names, ``self._x`` / ``cls._x`` attributes,
  ``__slots__``) and ``x`` is neither ``self`` / ``cls`` nor a dicomnode module, unless it
  is one of the few standard-library private names listed in :data:`STDLIB_PRIVATE`;
* a private keyword argument (``construct_params(_check=False)``) that is no parameter
  of a dicomnode function;
* a private method defined in a class derived from a class of those packages (an
  override of its internals).
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dicomnode

LIBRARIES = frozenset({"pynetdicom", "highdicom", "pydicom", "sqlalchemy"})
PACKAGE = Path(dicomnode.__file__).parent
COMPAT = PACKAGE / "compat"

#: Standard-library private names dicomnode uses, each documented API despite the
#: underscore (``os._exit`` after fork, ``namedtuple._replace``, argparse's sub-parser
#: action type for annotations).
STDLIB_PRIVATE = frozenset({"_exit", "_getframe", "_replace", "_asdict", "_fields", "_make",
                            "_field_defaults", "_SubParsersAction"})

#: pynetdicom's state machine names (``"Sta6"``, ``"Evt17"``) are its internals too:
#: string constants that spell one belong in dicomnode/compat/pynetdicom.py.
FSM_NAME = re.compile(r"^(Sta|Evt)\d{1,2}$")

_ATTR_FUNCS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in LIBRARIES


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _class_level_names(stmt: ast.stmt) -> list[str]:
    """Names a class body statement defines: a method, or a class attribute."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
        return [stmt.name]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    return []


def defined_private_names(trees: Iterable[ast.AST]) -> set[str]:
    """Every leading-underscore name dicomnode itself defines."""
    out: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
            elif isinstance(node, ast.arg):
                names.append(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.append(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                names.append(node.attr)
            elif isinstance(node, ast.alias) and node.asname:
                names.append(node.asname)
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
                names.extend(c.value for c in ast.walk(node.value)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str))
            out.update(n for n in names if _private(n))
    return out


def private_parameters(trees: Iterable[ast.AST]) -> set[str]:
    """Every leading-underscore parameter name of a dicomnode function."""
    return {n.arg for tree in trees for n in ast.walk(tree)
            if isinstance(n, ast.arg) and _private(n.arg)}


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, defined: set[str], parameters: set[str]) -> None:
        self.path = path
        self.defined = defined
        self.parameters = parameters
        self.findings: list[Finding] = []
        self.lib_names: dict[str, str] = {}  # local name -> dotted origin in a library
        self.own_modules: set[str] = set()  # names bound to dicomnode modules / objects
        self.lib_vars: list[set[str]] = [set()]  # per scope: variables holding library objects

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what))

    # -- imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _library(alias.name):
                if any(_private(p) for p in alias.name.split(".")):
                    self.flag(node, f"import of private module {alias.name}")
                local = alias.asname or alias.name.split(".")[0]
                self.lib_names[local] = alias.name if alias.asname else local
            elif alias.name.split(".")[0] == "dicomnode":
                self.own_modules.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if _library(node.module):
            assert node.module is not None
            if any(_private(p) for p in node.module.split(".")):
                self.flag(node, f"import from private module {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    self.flag(node, f"import of private name {node.module}.{alias.name}")
                self.lib_names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif node.level or (node.module or "").split(".")[0] == "dicomnode":
            for alias in node.names:
                self.own_modules.add(alias.asname or alias.name)

    # -- scopes: which variables hold library objects

    def _from_library(self, node: ast.AST | None) -> bool:
        if node is None:
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return False
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and (sub.id in self.lib_names
                                              or sub.id in self.lib_vars[-1]):
                return True
        return False

    def _scan_scope(self, body: Iterable[ast.AST], args: ast.arguments | None) -> set[str]:
        held: set[str] = set(self.lib_vars[-1])  # closures see the enclosing scope
        self.lib_vars.append(held)
        if args is not None:
            for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
                if a is not None and self._from_library(a.annotation):
                    held.add(a.arg)
        for stmt in body:
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.Assign) and self._from_library(sub.value):
                    held.update(t.id for t in sub.targets if isinstance(t, ast.Name))
                elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name) and (
                        self._from_library(sub.annotation) or self._from_library(sub.value)):
                    held.add(sub.target.id)
                elif isinstance(sub, ast.withitem) and isinstance(sub.optional_vars, ast.Name) \
                        and self._from_library(sub.context_expr):
                    held.add(sub.optional_vars.id)
        self.lib_vars.pop()
        return held

    def visit_Module(self, node: ast.Module) -> None:
        # Imports first (they may come after a use in a function body).
        for stmt in ast.walk(node):
            if isinstance(stmt, ast.Import):
                self.visit_Import(stmt)
            elif isinstance(stmt, ast.ImportFrom):
                self.visit_ImportFrom(stmt)
        self.findings.clear()  # the ordered walk below reports the import findings
        self.lib_vars = [self._scan_scope(node.body, None)]
        self.generic_visit(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.lib_vars.append(self._scan_scope(node.body, node.args))
        self.generic_visit(node)
        self.lib_vars.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        lib_bases = [b for b in node.bases if self._from_library(b)]
        for base in lib_bases:
            cls = self._resolve(base)
            for stmt in node.body:
                for name in _class_level_names(stmt):
                    if _private(name) and (cls is None or hasattr(cls, name)):
                        self.flag(stmt, f"class {node.name} overrides private "
                                        f"{ast.unparse(base)}.{name}")
        self.generic_visit(node)

    def _resolve(self, node: ast.expr) -> object | None:
        parts = _dotted(node)
        if parts is None or parts[0] not in self.lib_names:
            return None
        origin = self.lib_names[parts[0]].split(".") + parts[1:]
        for i in range(len(origin), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(origin[:i]))
            except ImportError:
                continue
            try:
                for attr in origin[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                return None
            return obj
        return None

    # -- accesses

    def _check_access(self, node: ast.AST, value: ast.expr, name: str) -> None:
        if not _private(name):
            return
        root = _root(value)
        root_id = root.id if isinstance(root, ast.Name) else None
        shown = f"{ast.unparse(value)}.{name}"
        if root_id is not None and (root_id in self.lib_names or root_id in self.lib_vars[-1]):
            self.flag(node, f"private attribute of a library object: {shown}")
        elif isinstance(value, ast.Name) and (value.id in ("self", "cls")
                                              or value.id in self.own_modules):
            return
        elif name not in self.defined and name not in STDLIB_PRIVATE:
            self.flag(node, f"private attribute not defined by dicomnode: {shown}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_access(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (isinstance(node.func, ast.Name) and node.func.id in _ATTR_FUNCS
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            self._check_access(node, node.args[0], node.args[1].value)
        for kw in node.keywords:
            if kw.arg is not None and _private(kw.arg) and kw.arg not in self.parameters:
                self.flag(kw, f"private keyword argument {kw.arg}= of {ast.unparse(node.func)}")
        self.generic_visit(node)


def check_source(source: str, path: str = "<snippet>",
                 defined: set[str] | None = None) -> list[Finding]:
    """Findings in one module's source (``defined``: dicomnode's own private names)."""
    tree = ast.parse(source, filename=path)
    own, parameters = _DEFINED()
    checker = _Checker(path, own if defined is None else defined,
                       parameters if defined is None else set())
    checker.visit(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and FSM_NAME.match(node.value)):
            checker.findings.append(Finding(path, node.lineno,
                                            f"pynetdicom state machine name {node.value!r}"))
    return sorted(set(checker.findings), key=lambda f: (f.line, f.what))


def _package_files() -> Iterator[Path]:
    for p in sorted(PACKAGE.rglob("*.py")):
        if COMPAT not in p.parents:
            yield p


@functools.cache
def _DEFINED() -> tuple[set[str], set[str]]:  # noqa: N802 - a cached constant
    """dicomnode's own private names and private parameter names (compat/ excluded)."""
    trees = [ast.parse(p.read_text(), filename=str(p)) for p in _package_files()]
    return defined_private_names(trees), private_parameters(trees)


def check_package() -> list[Finding]:
    out: list[Finding] = []
    for p in _package_files():
        out.extend(check_source(p.read_text(), str(p.relative_to(PACKAGE))))
    return out


# --------------------------------------------------------------------------- tests


def test_no_private_library_names_outside_compat() -> None:
    findings = check_package()
    outside = [str(f) for f in findings]
    assert not outside, ("private names of pynetdicom / highdicom / pydicom / SQLAlchemy "
                         "outside dicomnode/compat/ (wrap them there):\n" + "\n".join(outside))


@pytest.mark.parametrize(("snippet", "expected"), [
    ("def run(assoc):\n    assoc._run_reactor()\n", "assoc._run_reactor"),
    ("from highdicom import _standard_utils\n", "highdicom._standard_utils"),
    ("import highdicom._standard_utils as su\n", "private module highdicom._standard_utils"),
    ("from pydicom.filewriter import _is_multi_value\n", "_is_multi_value"),
    ("from pynetdicom import _config\n", "pynetdicom._config"),
    ("from pynetdicom._handlers import x\n", "private module pynetdicom._handlers"),
    ("from pydicom.dataset import Dataset\ndef f(ds: Dataset):\n    return ds._dict\n",
     "library object: ds._dict"),
    ("import pydicom\nds = pydicom.dcmread('x')\nn = len(ds._dict)\n", "ds._dict"),
    ("def f(a):\n    return getattr(a.dul, '_kill_thread', False)\n", "a.dul._kill_thread"),
    ("def f(c):\n    return c.construct_params(_check=False)\n", "_check="),
    ("import highdicom as hd\nclass S(hd.seg.Segmentation):\n"
     "    def _check_and_cast_pixel_array(cls): ...\n", "overrides private"),
    ("from sqlalchemy import select\nq = select(1)\nq._raw_columns\n", "q._raw_columns"),
    ("from pynetdicom.association import Association\nclass A(Association):\n"
     "    _run_reactor = None\n", "overrides private"),
    ("def f(dul):\n    return dul.state_machine.current_state == 'Sta6'\n", "'Sta6'"),
    ("def f(q):\n    q.put('Evt17')\n", "'Evt17'"),
])
def test_checker_finds_private_uses(snippet: str, expected: str) -> None:
    findings = check_source(snippet)
    assert any(expected in str(f) for f in findings), findings


@pytest.mark.parametrize("snippet", [
    "import os\nos._exit(0)\n",
    "import sys\nsys._getframe()\n",
    "class A:\n    def __init__(self):\n        self._x = 1\n    def f(self):\n"
    "        return self._x\n",
    "from dicomnode.store import series as series_mod\nseries_mod._SEL_OLD\n",
    "from pydicom.dataset import Dataset\ndef f(ds: Dataset):\n    return ds.__class__\n",
    "import argparse\ndef f(sub: argparse._SubParsersAction): ...\n",
    "from pynetdicom.transport import AssociationSocket\nclass S(AssociationSocket):\n"
    "    _prefix: bytes | None = None\n    def _own(self): ...\n",
])
def test_checker_allows_own_and_stdlib_names(snippet: str) -> None:
    assert check_source(snippet, defined={"_x", "_SEL_OLD"}) == []
