"""Turn an /init payload into a folder holding the action: ``__main__.py`` (+ zip contents).

The action process runs with this folder as its working directory, so data files in a zip
are opened by relative path, and a ``virtualenv/`` folder in it is activated at start.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
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


def extract(code: str, binary: bool) -> str:
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


def _fill(folder: str, code: str, binary: bool) -> str:
    if not binary:
        with open(os.path.join(folder, "__main__.py"), "w", encoding="utf-8") as file:
            file.write(code)
        return folder
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
    if not os.path.isfile(os.path.join(folder, "__main__.py")):
        raise BuildError("Zip file does not include __main__.py")
    return folder


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
