"""Writing files so that a reader never sees half of one, and refusing, before any work, an output
that could not be written."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from .errors import IsvitError


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path``: no half-written file on error.
    Missing folders on the way are created. An ``OSError`` (a full disk, a folder that cannot be
    written) is raised as an ``IsvitError`` that says so in one sentence.

    ``path`` gets the permissions that ``open()`` gives a new file, 0666 less the umask (usually
    0644), not a temporary file's private 0600.
    """
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    except OSError as exc:
        raise IsvitError(f"cannot write {path} ({exc.strerror or exc})") from exc
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer may have put a file of its own there (safetensors does, with 0600)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise IsvitError(f"cannot write {path} ({exc.strerror or exc})") from exc
        raise


# What an output is, for check_output: a file written whole (``atomic_write``: a temporary file
# beside it, moved onto its name), a folder files are written into (``--resume DIR``), or a folder
# written whole (``--openvino DIR``: a temporary folder beside it, renamed to its name).
FILE, FOLDER, NEW_FOLDER = "file", "folder", "new folder"


def check_output(path: str | Path, kind: str = FILE, label: str | None = None) -> Path:
    """Refuse, in one sentence (``IsvitError``), an output that could not be written, before any work
    is done for it; returns ``path`` as a ``Path``. ``kind``: ``FILE``, ``FOLDER`` or ``NEW_FOLDER``
    (above); ``label`` names the output in the sentence (default: the path), e.g. ``--save OUT``.

    Refused: a folder where a file is expected, a file where a folder is, a ``NEW_FOLDER`` that is
    not empty, and a place where the writer cannot create its files. Missing folders on the way are
    not refused: the writers create them, as ``mkdir -p`` does. Nothing is created or left behind.
    """
    # os.path's exists and isdir, not Path's: they answer False, not raise, where a folder on the
    # way cannot be searched (no permission), and the try below then says so.
    path = Path(path)
    label = label or str(path)
    if kind == FILE and os.path.isdir(path):
        raise IsvitError(f"{label} is a folder: give the name of a file to write")
    if kind != FILE and os.path.exists(path) and not os.path.isdir(path):
        raise IsvitError(f"{label} is a file, not a folder")
    if kind == NEW_FOLDER and os.path.isdir(path):
        try:
            empty = not os.listdir(path)
        except OSError as exc:
            raise IsvitError(f"cannot write {label}: its files cannot be listed ({exc.strerror or exc})") from None
        if not empty:
            raise IsvitError(f"{label} is not empty: give a new or empty folder")
    # Where the writer creates its files: beside a file or a new folder, inside a folder.
    place = path.absolute() if kind == FOLDER else path.absolute().parent
    while not os.path.exists(place):  # the nearest folder that exists: the writer creates the others in it
        place = place.parent
    if not os.path.isdir(place):
        raise IsvitError(f"cannot write {label}: {place} is a file, not a folder")
    _try_creating_a_file(place, label)
    return path


def _try_creating_a_file(folder: Path, label: str) -> None:
    """Create and remove a temporary file in ``folder``, or refuse ``label`` in one sentence.

    A real try rather than ``os.access``: permission bits do not tell for root (who bypasses them),
    for /proc or /sys, or for a read-only mount.
    """
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".isvit-", suffix=".tmp")
    except OSError as exc:
        raise IsvitError(f"cannot write {label}: no file can be created in {folder} ({exc.strerror or exc})") from None
    try:
        os.close(fd)
    finally:
        os.unlink(name)
