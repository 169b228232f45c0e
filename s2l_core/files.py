"""Reading and writing files safely: atomic writes, locks, and image input/output.

Every file the package writes goes through :func:`atomic_path`: the content is written
to a temporary file in the destination folder and renamed over the destination only once
it is complete, so a crash or an interrupted run never leaves a half-written file where a
finished one is expected. :func:`atomic_dir` does the same for whole folders.

Temporaries carry the id of the process that made them (``.<name>.<pid>-<random>.tmp``);
:func:`remove_stale` deletes those of processes that no longer run, so a run killed
outright leaves nothing behind for long. :func:`locked` serialises processes that share a
folder (two ``s2l prepare`` runs on one cache). Long work that fills a folder file by file
keeps its finished files in an :func:`unfinished_dir`, which the next run takes over.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from s2l_core.runtime import process_running

__all__ = [
    "IMAGE_SUFFIXES",
    "UNFINISHED_RECORD",
    "atomic_dir",
    "atomic_path",
    "check_writable",
    "lock_of",
    "locked",
    "place_dir",
    "read_image",
    "read_json",
    "remove_stale",
    "sha256_of",
    "unfinished_dir",
    "write_image",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike
#: File suffixes read as images (by :func:`read_image`).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _tmp_prefix(path: Path) -> str:
    """Prefix of the temporaries that stand in for ``path``: hidden, with this process's id."""
    return f".{path.name}.{os.getpid()}-"


def _start_time(pid: int | str) -> float | None:
    """When process ``pid`` (or ``"self"``) started, in seconds since the epoch (Linux;
    None where that cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after the time ``when`` (False where that cannot be
    told), i.e. its id was reused and a temporary dated ``when`` cannot be its own."""
    start = _start_time(pid)
    return start is not None and start > when + 1.0


#: When this module was imported: a bound on when this process started.
_IMPORTED = time.time()


def remove_stale(path: PathLike, *, held: bool = False) -> list[Path]:
    """Delete the temporaries of ``path`` left behind by processes that no longer run.

    :func:`atomic_path` and :func:`atomic_dir` name their temporaries
    ``.<name>.<pid>-<random>.tmp[<suffix>]`` (and ``.old`` for a folder being replaced)
    beside ``path``. Those whose process has ended (or whose process id now belongs to a
    process started after the temporary was last written) are removed; those of running
    processes, this one included, are left alone. Nothing else is touched.

    Parameters
    ----------
    path : str or os.PathLike
        The destination file or folder whose temporaries to clean.
    held : bool, optional
        The caller holds the lock (:func:`locked`) that every process writing ``path``
        takes. Temporaries without a process id in their name (``.<name>.<random>.tmp``,
        as earlier versions named them) are then removed too, if older than this
        process.

    Returns
    -------
    list of pathlib.Path
        What was removed.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    head = f".{path.name}."
    started = min(_start_time("self") or _IMPORTED, _IMPORTED) if held else 0.0
    for entry in path.parent.iterdir():
        name = entry.name
        if not name.startswith(head):
            continue
        tail = name[len(head) :]
        if not (".tmp" in tail or tail.endswith(".old")):
            continue
        pid_text, dash, _ = tail.split(".", 1)[0].partition("-")
        try:
            mtime = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if dash and pid_text.isdigit():
            pid = int(pid_text)
            if process_running(pid) and not _started_after(pid, mtime):
                continue  # its process still runs
        elif dash or not held or mtime >= started:
            continue  # not one of ours, or not known to be stale
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable(folder: PathLike) -> Path:
    """Check that files can be created in ``folder`` (created if missing), by creating one.

    Call it before long work whose result goes there, so that a read-only folder is
    found before the work rather than after.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder.

    Returns
    -------
    pathlib.Path
        ``folder``.

    Raises
    ------
    NotADirectoryError
        If ``folder`` (or a folder above it) is a file.
    PermissionError, OSError
        If the folder cannot be created or written, naming it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=_tmp_prefix(folder / "probe"), suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def lock_of(path: PathLike) -> Path:
    """The lock file of a destination: ``.<name>.lock`` beside it (for :func:`locked`)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def locked(path: PathLike, what: str = "this folder") -> Iterator[Path]:
    """Hold an exclusive lock on the lock file ``path`` for the duration of the block.

    Other processes that ask for the same lock wait (saying once, on stderr, what they
    wait for); the lock is released when the block ends or the process dies, so a killed
    process never leaves a lock behind. Within one process the lock is re-entrant. The
    lock file itself is kept (removing it would let two processes lock two files).

    Parameters
    ----------
    path : str or os.PathLike
        The lock file (created if missing).
    what : str, optional
        What the lock protects, for the waiting message.

    Yields
    ------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    key = str(path.resolve())
    with _HELD_LOCK:
        nested = _HELD.get(key, 0) > 0
        if nested:
            _HELD[key] += 1
    if nested:
        try:
            yield path
        finally:
            with _HELD_LOCK:
                _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")  # held until the block ends
    try:
        if not _try_lock(handle):
            print(
                f"waiting for another process that is using {what} (lock {path})",
                file=sys.stderr,
                flush=True,
            )
            while not _try_lock(handle):
                time.sleep(0.2)
        with _HELD_LOCK:
            _HELD[key] = 1
        try:
            yield path
        finally:
            with _HELD_LOCK:
                _HELD.pop(key, None)
    finally:
        handle.close()  # releases the lock


def _try_lock(handle) -> bool:
    """Take an exclusive lock on an open file without waiting; True if taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds.

    The temporary file lies in the same folder as ``path`` (so the final rename is
    atomic on POSIX file systems) and keeps the suffix of ``path`` (so libraries that
    choose a format by suffix still work). If the block raises, the temporary file is
    removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The destination file.

    Yields
    ------
    pathlib.Path
        Where to write the content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _tmp_prefix(path), f".tmp{path.suffix}"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder ``path`` when the block succeeds.

    An existing folder at ``path`` is replaced only after the new one is complete; if the
    block raises, the temporary folder is deleted and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The destination folder.
    replace : bool, optional
        ``False``: ``path`` must still be absent (or an empty folder) when the block
        ends; a folder with files that appeared there meanwhile is never replaced.

    Yields
    ------
    pathlib.Path
        An empty folder to fill.

    Raises
    ------
    FileExistsError
        With ``replace=False``, if a folder with files appeared at ``path`` while the
        block ran (the temporary folder is deleted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        # mkdtemp makes 0700; the folder gets the mode of the one it replaces, else the
        # mode the user's umask gives a new folder.
        if path.is_dir():
            shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if not replace:
            place_dir(tmp, path)
        elif path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def place_dir(folder: PathLike, path: PathLike) -> None:
    """Rename the finished folder ``folder`` to ``path``, where no folder with files may be.

    Raises
    ------
    FileExistsError
        If a file, or a folder with files, is at ``path`` (it appeared while the results
        were made); nothing is replaced, and ``folder`` stays where it is.
    """
    try:
        os.rename(folder, path)  # replaces an empty folder, never one with files
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise FileExistsError(
            errno.EEXIST,
            "appeared while the results were made; nothing was replaced",
            str(path),
        ) from None


def sha256_of(path: PathLike) -> str:
    """The SHA-256 of a file's content, as hexadecimal, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: The record of an :func:`unfinished_dir`, inside it.
UNFINISHED_RECORD = ".s2l-unfinished.json"


def _unfinished_dirs(path: Path) -> list[tuple[float, Path, int]]:
    """``(mtime, folder, process id)`` of the unfinished folders of ``path``, newest first."""
    head = f".{path.name}.unfinished."
    found = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            pid = entry.name[len(head) :]
            if entry.name.startswith(head) and pid.isdigit() and entry.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.stat().st_mtime, entry, int(pid)))
    return sorted(found, key=lambda e: -e[0])


def _unfinished_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / UNFINISHED_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _move_dir(source: Path, target: Path) -> None:
    """Rename the folder ``source`` to ``target``; copy, then delete it, across file
    systems (a copy cut short leaves ``source`` whole)."""
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copytree(source, target)
        shutil.rmtree(source)


def unfinished_dir(
    path: PathLike,
    settings: Any,
    extra: dict | None = None,
    *,
    what: str = "this folder",
    formerly: PathLike | None = None,
) -> tuple[Path, dict | None]:
    """Make the folder that keeps the finished files of a folder ``path`` until all are
    done, or take over the one that a run which stopped left behind.

    The folder is ``.<name>.unfinished.<pid>`` beside ``path``, named after the process
    that works in it, with a record of ``settings`` and ``extra`` (JSON) in it
    (:data:`UNFINISHED_RECORD`). Such a folder of a process that no longer runs is taken
    over, renamed for this process, when its record holds the same ``settings``; one with
    other settings is deleted. Which of its files still hold is the caller's to judge
    from the record returned. :func:`remove_stale` leaves these folders alone: they are
    kept on purpose, for the next run.

    Parameters
    ----------
    path : str or os.PathLike
        The folder that will be made from this one once every file is done.
    settings : object
        Whatever decides the files' content (JSON: mappings, lists, strings, numbers).
    extra : dict, optional
        More to record, e.g. what each file was made from.
    what : str, optional
        What is being written, for the error messages.
    formerly : str or os.PathLike, optional
        Another path whose unfinished folders hold the same files, looked at (and taken
        over or deleted) as those of ``path`` are: where a run that stopped kept its
        files when the folder to fill lay elsewhere.

    Returns
    -------
    folder : pathlib.Path
        The folder to fill, with the new record in it.
    record : dict or None
        The record of the folder taken over (``"settings"`` and the ``extra`` items), or
        None if the folder is new.

    Raises
    ------
    FileExistsError
        If a process that still runs is filling an unfinished folder of ``path`` (or
        took over the one found at the same moment), or a folder of that name holds files
        but no record (it is not one of this package's, and is left alone).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = path.parent / f".{path.name}.unfinished.{os.getpid()}"
    settings = json.loads(json.dumps(settings))  # as it reads back from the record
    found = _unfinished_dirs(path)
    if formerly is not None:
        found = sorted(found + _unfinished_dirs(Path(formerly)), key=lambda e: -e[0])
    for mtime, folder, pid in found:
        if pid != os.getpid() and process_running(pid) and not _started_after(pid, mtime):
            raise FileExistsError(
                errno.EEXIST,
                f"another process (id {pid}) is writing {what} now, in {folder.name}; wait "
                "until it ends, or choose another output folder",
                str(path),
            )
    taken = None
    for _, folder, _ in found:
        record = _unfinished_record(folder)
        if record is None and any(folder.iterdir()):
            raise FileExistsError(
                errno.EEXIST,
                f"{folder} holds files but no record {UNFINISHED_RECORD}, so it is not a "
                "folder this package left behind; move it away",
                str(path),
            )
        if taken is None and record is not None and record.get("settings") == settings:
            if folder != mine:
                try:
                    _move_dir(folder, mine)
                except FileNotFoundError:
                    raise FileExistsError(
                        errno.EEXIST,
                        f"another process took over {folder.name} at the same moment; "
                        "wait until it ends, or choose another output folder",
                        str(path),
                    ) from None
            taken = record
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if taken is None:
        mine.mkdir()  # the mode the user's umask gives a new folder
    write_json(mine / UNFINISHED_RECORD, {**(extra or {}), "settings": settings})
    return mine, taken


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically: the file holds the old text or
    the new, never part of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file into a numpy array, keeping its bit depth.

    PNG, JPEG, BMP and TIFF are supported. 16-bit images stay ``uint16``; TIFF files are
    read with :mod:`tifffile`, so multi-sample and 16-bit TIFFs keep their values.
    Palette images become RGB (RGBA with transparency), grey with alpha becomes grey, and
    CMYK or other colour spaces become RGB.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` for grey or label images, ``(H, W, C)`` for colour images.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be decoded as an image, or declares more pixels than
        Pillow's guard against decompression bombs allows (``PIL.Image.MAX_IMAGE_PIXELS``
        times two, about 179 million).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im, dtype=np.uint16)
            if im.mode == "I":
                return np.array(im, dtype=np.int64).astype(np.uint32)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" else "RGB")
            elif im.mode in ("LA", "La"):  # grey with alpha: the grey (alpha dropped)
                im = im.convert("L")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):  # a colour image, as RGB
                im = im.convert("RGB")
            return np.array(im)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"{path} declares more pixels than an image may have here ({err}); split it "
            "into smaller images (tiles) to segment it"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from err


def write_image(path: PathLike, array: np.ndarray, *, compress_level: int = 1) -> None:
    """Write a 2-D or RGB(A) array as PNG or TIFF, chosen by suffix, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; ``.png`` or ``.tif``/``.tiff``.
    array : numpy.ndarray
        ``(H, W)`` of ``uint8``/``uint16`` (PNG) or any integer dtype (TIFF), or
        ``(H, W, 3|4)`` of ``uint8``.
    compress_level : int, optional
        PNG compression (0–9); 1 is fast and still compact for masks.

    Raises
    ------
    ValueError
        If the array's shape or dtype cannot be stored in the requested format.
    """
    path = Path(path)
    array = np.asarray(array)
    suffix = path.suffix.lower()
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"cannot write an array of shape {array.shape} as an image: {path}")
    with atomic_path(path) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, array, compression="zlib")
        elif suffix == ".png":
            if array.dtype == np.uint8 or (array.dtype == np.uint16 and array.ndim == 2):
                Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
            else:
                raise ValueError(
                    f"PNG holds uint8 images or 2-D uint16 images, not {array.dtype} of shape "
                    f"{array.shape}; use a .tif path for other label types: {path}"
                )
        else:
            raise ValueError(f"unsupported image suffix {path.suffix!r} (use .png or .tif): {path}")
