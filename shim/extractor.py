"""Turn an /init payload into a folder holding the action: ``__main__.py`` (+ zip contents).

The action process runs with this folder as its working directory, so data files in a zip
are opened by relative path, and a ``virtualenv/`` folder in it is activated at start.

Note [Prebuilt ActionLoop zips]: the stock runtime's ``-compile`` step (``docker run -i
IMAGE -compile main``, how large actions are deployed) turns a zip into a build: ``exec``
(a script that runs ``exec__.py``), ``exec__.py`` (the launcher, whose line ``from main__
import NAME as main`` names the entry point) and ``main__.py`` (the action), beside any
``virtualenv/``. The stock proxy runs an archive whose ``exec`` is an executable (``#!`` or
ELF) as it is, without compiling, and ignores the /init ``main``. Here the same build runs
through this runtime's own launcher: ``main__.py`` imported, NAME called, the /init ``main``
ignored as on stock. An ``exec`` that is not a Python build (no ``exec__.py``: a Go or Rust
binary) cannot run in a Python runtime and is refused at /init. An ``exec`` that is not an
executable is the action's source, as the stock compile step reads it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import re
import shutil
import tarfile
import tempfile
import zipfile

ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b\x08"
MAX_UNPACKED_BYTES = 2 << 30      # an archive that unpacks to more is refused (a zip bomb)


class DecodeError(Exception):
    """The code is not valid base64 (→ 400 "cannot decode the request: …")."""


class BuildError(Exception):
    """No runnable action in the payload (→ 502; the reason goes to stderr)."""


@dataclasses.dataclass(frozen=True)
class Action:
    """An extracted action: its folder, the file the launcher imports, and for a prebuilt
    zip the entry point its build names (then the /init ``main`` is ignored)."""
    folder: str
    entry: str = "__main__.py"
    main: str | None = None

    @property
    def prebuilt(self) -> bool:
        return self.main is not None


# The line the stock compile step writes into exec__.py (Note [Prebuilt ActionLoop zips]).
BUILD_ENTRY = re.compile(rb"^from main__ import (\w+) as main\s*$", re.MULTILINE)
INVALID_VIRTUALENV = "Invalid virtualenv. Zip file does not include 'activate_this.py'."


def extract(code: str, binary: bool) -> Action:
    """A new folder holding the action; raises DecodeError or BuildError, and then leaves
    nothing behind."""
    folder = tempfile.mkdtemp(prefix="faastube-action-")
    try:
        return _fill(folder, code, binary)
    except BaseException:
        remove(folder)
        raise


def remove(folder: str) -> None:
    """Delete an action folder (a failed /init's, or the action's at stop)."""
    shutil.rmtree(folder, ignore_errors=True)


def _fill(folder: str, code: str, binary: bool) -> Action:
    if not binary:
        with open(os.path.join(folder, "__main__.py"), "w", encoding="utf-8") as file:
            file.write(code)
        return Action(folder)
    try:
        data = base64.b64decode(code, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(str(exc)) from None
    if data.startswith(ZIP_MAGIC):
        _unzip(data, folder)
    elif data.startswith(GZIP_MAGIC):
        _untar(data, folder)
    else:
        raise BuildError("the binary code is neither a zip nor a tar.gz archive")
    prebuilt = _prebuilt(folder)
    if prebuilt is not None:
        return prebuilt
    if not os.path.isfile(os.path.join(folder, "__main__.py")):
        raise BuildError("Zip file does not include __main__.py")
    if os.path.isdir(os.path.join(folder, "virtualenv")) and activate_this(folder) is None:
        raise BuildError(INVALID_VIRTUALENV)
    return Action(folder)


def _prebuilt(folder: str) -> Action | None:
    """The build in ``folder`` if its ``exec`` is an executable (Note [Prebuilt ActionLoop
    zips]); an ``exec`` that is not becomes ``__main__.py``, as the stock compile step moves it."""
    executable = os.path.join(folder, "exec")
    if not os.path.isfile(executable):
        return None
    with open(executable, "rb") as file:
        head = file.read(4)
    if not (head.startswith(b"#!") or head == b"\x7fELF"):
        if not os.path.exists(os.path.join(folder, "__main__.py")):
            os.rename(executable, os.path.join(folder, "__main__.py"))
        return None
    launcher = os.path.join(folder, "exec__.py")
    if not os.path.isfile(launcher):
        raise BuildError("the archive's exec is a prebuilt binary, and this runtime runs Python "
                         "actions: a Python build has exec__.py and main__.py beside its exec")
    with open(launcher, "rb") as file:
        named = BUILD_ENTRY.search(file.read())
    return Action(folder, "main__.py", named.group(1).decode() if named else "main")


def activate_this(folder: str) -> str | None:
    """The ``activate_this.py`` of the action's ``virtualenv/``, where the stock runtime
    looks (``bin/``, or ``Scripts/`` for one made on Windows); None if it has none."""
    venv = os.path.join(folder, "virtualenv")
    return next((path for path in (os.path.join(venv, where, "activate_this.py") for where in ("bin", "Scripts"))
                 if os.path.exists(path)), None)


def _bounded(unpacked: int) -> None:
    if unpacked > MAX_UNPACKED_BYTES:
        raise BuildError(f"the archive unpacks to {unpacked} bytes, more than the "
                         f"{MAX_UNPACKED_BYTES} an action may hold")


def _inside(folder: str, name: str) -> str:
    target = os.path.realpath(os.path.join(folder, name))
    if not target.startswith(os.path.realpath(folder) + os.sep):
        raise BuildError(f"archive member {name!r} points outside the action folder")
    return target


def _unzip(data: bytes, folder: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            _bounded(sum(info.file_size for info in archive.infolist()))
            for info in archive.infolist():
                _inside(folder, info.filename)
                archive.extract(info, folder)
                mode = info.external_attr >> 16
                if mode & 0o111:       # keep executables executable (virtualenv/bin/*)
                    os.chmod(os.path.join(folder, info.filename), mode & 0o777)
    except zipfile.BadZipFile as exc:
        raise BuildError(f"cannot read the zip file: {exc}") from None


def _untar(data: bytes, folder: str) -> None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            _bounded(sum(member.size for member in archive.getmembers()))
            for member in archive.getmembers():
                _inside(folder, member.name)
                if member.issym() or member.islnk():
                    _inside(folder, os.path.join(os.path.dirname(member.name), member.linkname))
            archive.extractall(folder)
    except tarfile.TarError as exc:
        raise BuildError(f"cannot read the tar.gz file: {exc}") from None
