"""The only modules that touch another library's private names.

Each submodule (``pynetdicom``, ``highdicom``, ``pydicom``, ``sqlalchemy``) wraps the
private attributes, functions and import paths of one library that dicomnode relies on,
and calls :func:`require` at import time: the patch was written against one exact
release, and a different installed release fails at once with one line naming the
package, the version found and the version the patch was written for, instead of
misbehaving somewhere deep in the receive or encode path.

Nothing outside ``dicomnode/compat/`` may access a leading-underscore attribute of an
object from these libraries or import one of their private modules;
``tests/unit/test_compat_private_names.py`` walks the AST of the package and fails
on any such access.
"""

from __future__ import annotations

from importlib import metadata

from dicomnode.errors import DicomNodeError


class IncompatibleLibrary(DicomNodeError):
    """The installed release of a library differs from the one a compat patch targets."""


def require(package: str, pinned: str) -> None:
    """Fail with one line unless ``package`` is installed at exactly ``pinned``.

    Parameters
    ----------
    package:
        The distribution name, as pip knows it (``pynetdicom``, ``SQLAlchemy``).
    pinned:
        The release the calling compat module was written and tested against; a
        prefix such as ``"2.1."`` accepts any release starting with it.
    """
    try:
        found = metadata.version(package)
    except metadata.PackageNotFoundError:
        found = "not installed"
    ok = found.startswith(pinned) if pinned.endswith(".") else found == pinned
    if not ok:
        raise IncompatibleLibrary(
            f"dicomnode.compat: {package} {found} is installed, but dicomnode's patches of "
            f"its internals were written for {package} {pinned.rstrip('.')}"
            f"{'.x' if pinned.endswith('.') else ''}; install the pinned release "
            f"(pyproject.toml) or port dicomnode/compat/ to the new one")
