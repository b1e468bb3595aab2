"""Reading the files users hand to cachefit (plans, device maps), and writing the files cachefit
makes (plans, exports, charts, reports, device files, outputs), with errors that name the file.

Every write goes to a hidden temporary file in the target's folder, is fsynced, then renamed into
place (``os.replace``): a failed write (full disk, no permission, a missing folder) leaves no partial
file and any earlier file intact.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import itertools
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachefit.errors import ConfigError
from cachefit.limits import MAX_FILE_BYTES, MAX_JSON_DEPTH, limit_error


def read_text(path: str | os.PathLike[str], *, where: str) -> str:
    """Read a UTF-8 text file of at most :data:`~cachefit.limits.MAX_FILE_BYTES` bytes.

    The read is bounded, so ``/dev/zero`` or an endless pipe stops at the limit; a leading UTF-8
    byte-order mark is dropped.

    Args:
        path: the file.
        where: how to name the file in messages, e.g. ``plan file 'p.json'``.

    Raises:
        ConfigError: the file cannot be read, is over the size limit, or is not UTF-8 (the message
            gives the byte offset of the first bad byte).
    """
    limit = MAX_FILE_BYTES
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                raise limit_error("MAX_FILE_BYTES", where=where, what="size", value=info.st_size)
            chunks: list[bytes] = []
            total = 0
            while total <= limit:  # read at most limit + 1 bytes, 1 MiB at a time
                chunk = f.read(min(2**20, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if total > limit:
        raise limit_error("MAX_FILE_BYTES", where=where, what="size")  # not known: the read stopped
    data = b"".join(chunks)
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise ConfigError(
            f"{where}: byte 0x{data[offset]:02x} at offset {offset:,} is not UTF-8 ({exc.reason}); "
            "save the file as UTF-8 text"
        ) from None


# JSON strings (with their escapes) and everything that is not a bracket: removed before the
# depth scan, so brackets inside strings do not count.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, found without recursion.

    A scan of the brackets outside strings (C-speed regular expressions, then a running sum), so it
    is safe on text nested far deeper than Python's JSON parser can recurse. On malformed text it is
    an estimate; the parser then reports the syntax error.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number cachefit accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a float")
    return value


def parse_json(text: str, *, where: str, finite: bool = True) -> Any:
    """Parse JSON text after checking its nesting depth (:data:`~cachefit.limits.MAX_JSON_DEPTH`).

    Args:
        text: the document.
        where: how to name its source in messages.
        finite: refuse ``NaN``, ``Infinity`` and numbers too large for a float (a plan or device
            map never holds them; a Hugging Face config may, in keys cachefit does not read).

    Raises:
        ConfigError: not JSON, nested too deep, or a non-finite number where ``finite``.
    """
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise limit_error("MAX_JSON_DEPTH", where=where, what="nesting depth", value=depth)
    hooks: dict[str, Any] = {"parse_constant": _refuse_constant, "parse_float": _finite_float} if finite else {}
    try:
        return json.loads(text, **hooks)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the syntax") from None
    except ValueError as exc:  # a hook's refusal, or an integer of more than 4,300 digits
        raise ConfigError(f"{where}: {exc}; write finite numbers") from None
    except RecursionError:  # unreachable after the depth check; kept as a last guard
        raise limit_error("MAX_JSON_DEPTH", where=where, what="nesting depth") from None


def read_json(path: str | os.PathLike[str], *, what: str, finite: bool = True) -> Any:
    """Parse a JSON file; a missing, unreadable, oversized, non-UTF-8, too deeply nested or
    malformed file (or one holding NaN / Infinity, unless ``finite`` is False) is a ConfigError
    naming ``what``."""
    where = f"{what} {os.fspath(path)!r}"
    return parse_json(read_text(path, where=where), where=where, finite=finite)


# --------------------------------------------------------------------------------------------
# Writing: temporary file in the same folder, fsync, rename
# --------------------------------------------------------------------------------------------

# what to change, by the reason a write failed; the rest get "give a writable path"
_ADVICE = {
    errno.ENOSPC: "free some space or give a path on another disk",
    errno.EDQUOT: "free some space or give a path on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder; give another path",
    errno.EROFS: "the file system is read-only; give a writable path",
}


def _write_error(what: str, path: str | os.PathLike[str], exc: OSError, *, verb: str = "write") -> ConfigError:
    reason = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno or 0, "give a writable path")
    if exc.errno == errno.ENOENT:
        parent = os.path.dirname(os.path.abspath(path))
        advice = (f"the folder {parent!r} does not exist; create it or give another path" if not os.path.isdir(parent)
                  else "the folder takes no new files (e.g. /proc); give another path")
    return ConfigError(f"{what} {os.fspath(path)!r}: cannot {verb} it ({reason}); {advice}")


def _umask() -> int:
    # os.umask both sets and returns it: set it back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(path: str | os.PathLike[str], *, what: str) -> Path:
    """The file a write will replace: a symlink is followed (the link stays a link); anything that
    exists and is not a regular file (a folder, /dev/full, a pipe) is refused, since renaming onto
    it would replace the device or folder itself."""
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise _write_error(what, path, exc) from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{what} {os.fspath(path)!r}: it is a folder; give a file path")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {os.fspath(path)!r}: not a regular file (a device or pipe); give a file path")
    if not os.access(target, os.W_OK):
        # a rename would replace a read-only file silently; a plain write would have failed
        raise ConfigError(f"{what} {os.fspath(path)!r}: the file is read-only; make it writable or give another path")
    return target


def _temp_name(target: Path) -> dict[str, str]:
    # hidden, unique, in the target's folder (so the rename is atomic), with the target's suffix
    # (so a writer that picks a format by extension, or appends one, still writes this file);
    # the name is cut so that the temporary one stays under the usual 255-byte limit
    return {"dir": os.fspath(target.parent), "prefix": f".{target.name[:100]}.", "suffix": ".tmp" + target.suffix[:20]}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        try:
            os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: a file system without fsync; nothing to flush
                raise


def _fsync_dir(path: Path) -> None:
    # makes the rename itself durable; not every file system can open or sync a folder
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(path: str | os.PathLike[str], *, what: str, suffix: str | None = None) -> None:
    """Fail now, before long work, if ``path`` could not be written later.

    The folder must exist and take a new file (a temporary one is created and removed there); an
    existing ``path`` must be a writable regular file.

    Args:
        path: the file to be written.
        what: how the user named it (an option such as ``--save-outputs``), for the message.
        suffix: the ending the name must have (e.g. ``.png``), case-insensitive; None: any.

    Raises:
        ConfigError: the path cannot be written, with the reason and what to change.
    """
    if suffix is not None and not Path(path).name.lower().endswith(suffix.lower()):
        raise ConfigError(f"{what} {os.fspath(path)!r}: the file is written as {suffix.lstrip('.').upper()}; "
                          f"give a name ending in {suffix}, e.g. {os.fspath(path) + suffix!r}")
    target = _target(path, what=what)
    try:
        fd, name = tempfile.mkstemp(**_temp_name(target))
    except OSError as exc:
        raise _write_error(what, path, exc) from None
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, what: str) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder to write; on success it is renamed onto ``path``.

    For writers that need a file name (``savefig``, safetensors ``save_file``). If the block raises,
    the temporary file is removed and any earlier ``path`` is left as it was. The new file gets the
    earlier file's permissions, or the usual ones (0666 less the umask) when there was none.

    Raises:
        ConfigError: the folder does not take the file, or the block raised an ``OSError``; the
            message names ``what`` and ``path`` with the reason. Other exceptions pass through.
    """
    target = _target(path, what=what)
    try:
        fd, name = tempfile.mkstemp(**_temp_name(target))
    except OSError as exc:
        raise _write_error(what, path, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()  # mkstemp made it 0600
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_error(what, path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, what: str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path, what=what) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, what: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` whole or not at all (see :func:`atomic_path`); returns ``path``."""
    return write_bytes_atomic(path, text.encode(encoding), what=what)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success its files go to ``path``.

    A new folder appears whole or not at all: the temporary one is renamed onto ``path``. Into a
    folder that already exists, each file is renamed onto its namesake there, one at a time (each
    file whole, old or new); other files in that folder are kept. Only files at the top of the
    temporary folder are moved. The parent folder must exist. If the block raises, the temporary
    folder is removed and ``path`` is left as it was.

    Raises:
        ConfigError: ``path`` is a file, its folder does not take a new folder, or the block raised
            an ``OSError``; the message names ``what`` and ``path`` with the reason.
    """
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))  # move the files where the link points
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{what} {os.fspath(path)!r}: it is a file, not a folder; give a folder path")
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:100]}.", suffix=".tmp"))
    except OSError as exc:
        raise _write_error(what, path, exc, verb="create") from None
    try:
        yield tmp
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for file in files:
            _fsync_file(file)
        if target.is_dir():
            for file in files:
                os.replace(file, target / file.name)
            _fsync_dir(target)
        else:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
            os.rename(tmp, target)
            _fsync_dir(target.parent)
    except OSError as exc:
        raise _write_error(what, path, exc, verb="create") from None
    finally:
        # gone already when it was renamed onto ``path``
        shutil.rmtree(tmp, ignore_errors=True)
