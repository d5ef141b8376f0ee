"""Safe writes: a file either appears whole or not at all, and nothing that was there is lost.

Every file kriallm writes for a user (.kq, checkpoints, reports, logits, board files) goes through
:func:`safe_writer` (or its two shorthands):

1. The target is checked first: an existing target that is not a regular file (a directory, a FIFO,
   a device node, a socket) is refused, never replaced; its directory must exist.
2. The data goes to a temporary file in the target's own directory (so the rename cannot cross
   file systems), is flushed and fsync'ed, and is then renamed over the target in one step.
3. On any failure or interrupt the temporary file is removed and an existing target is left
   untouched. Operating-system errors become one :class:`~sw.contract.errors.OutputError` sentence
   naming the file and the cause (disk full, read-only file system, permission, size limit).

The CLI ignores SIGXFSZ, so a file-size limit (``ulimit -f``) surfaces here as EFBIG instead of
killing the process with a partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .contract.errors import OutputError

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is larger than the file-size limit",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "an I/O error occurred",
}


def describe_os_error(e: OSError) -> str:
    """The cause of `e` in a few plain words."""
    return _CAUSES.get(e.errno, e.strerror or str(e))


def check_target(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` as an absolute Path if a regular file may be written there; else OutputError."""
    p = Path(path).expanduser()
    p = p.parent.resolve() / p.name if p.name else p.resolve()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"cannot write the {what} {p}: {describe_os_error(e)}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise OutputError(f"refusing to write the {what} over {p}: it is {kind}, not a regular file")
    if not p.parent.is_dir():
        raise OutputError(f"cannot write the {what} {p}: its directory {p.parent} does not exist")
    return p


@contextlib.contextmanager
def safe_writer(path: str | os.PathLike, what: str = "output") -> Iterator[BinaryIO]:
    """A binary file object whose contents replace `path` only if the block finishes."""
    target = check_target(path, what)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as e:
        raise OutputError(f"cannot write the {what} {target}: {describe_os_error(e)}") from None
    tmp = Path(tmp_name)
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)      # keep the mode of the file replaced
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        check_target(target, what)          # still not a FIFO/device/directory, just before the rename
        os.replace(tmp, target)
        done = True
    except OSError as e:
        raise OutputError(f"cannot write the {what} {target}: {describe_os_error(e)}; "
                          f"nothing was written") from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()


def safe_write_bytes(path: str | os.PathLike, data: bytes, what: str = "output") -> Path:
    with safe_writer(path, what) as f:
        f.write(data)
    return Path(path)


def safe_write_text(path: str | os.PathLike, text: str, what: str = "output") -> Path:
    return safe_write_bytes(path, text.encode("utf-8"), what)


@contextlib.contextmanager
def safe_directory(path: str | os.PathLike, what: str = "output directory",
                   replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """A fresh directory to fill; on success its files appear in `path` together, else nothing changes.

    A new `path` is the filled directory renamed into place. Into an existing directory each file is
    moved over its namesake, and then the files matching the `replaces` globs that this save did not
    write are removed (so a directory never mixes two saves); an existing file that is not a regular
    file is refused, never replaced.
    """
    target = Path(path).expanduser()
    target = target.parent.resolve() / target.name
    if target.exists() and not target.is_dir():
        raise OutputError(f"refusing to write the {what} {target}: it exists and is not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise OutputError(f"cannot write the {what} {target}: {describe_os_error(e)}") from None
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        else:
            written = sorted(tmp.iterdir())
            for f in written:
                check_target(target / f.name, what)
            stale = {p for pattern in replaces for p in target.glob(pattern)} - {target / f.name for f in written}
            for f in written:
                os.replace(f, target / f.name)
            for p in stale:
                p.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write the {what} {target}: {describe_os_error(e)}; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
