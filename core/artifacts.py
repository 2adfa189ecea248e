"""Content digests, checks of local trees against them, and atomic local writes.

The content-addressed artifact store, on local disk or object storage, is
:class:`aiplane.core.storage.ArtifactStore`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "sha256_path", "remembered_sha256", "digest_tree", "check_tree", "forget_check", "atomic_write_text", "atomic_write_bytes",
    "file_lock",
]  # fmt: skip

_CHUNK = 1 << 20


def sha256_path(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file, or of a directory tree (relative names and bytes, sorted)."""
    return digest_tree(path, each=False)[0]


def remembered_sha256(path: str | os.PathLike[str], records: str | os.PathLike[str]) -> str:
    """:func:`sha256_path` of ``path``, remembered in ``records`` (a directory of aiplane's own, not beside
    ``path``, which may be read-only or someone else's) with the size, mtime, ctime and inode of every file.

    While those hold, the next call reads no byte: any write to a file moves its
    ctime, which no user can set back (:func:`check_tree` trusts the same). For a
    multi-GB model directory, hashed by every run that names it and by the hint
    that prepares its server meanwhile: a caller that comes while another is hashing
    the same path waits for that digest instead of reading every byte a second time.
    """
    path = Path(path).absolute()
    record = Path(records) / (hashlib.sha256(os.fsencode(path)).hexdigest()[:32] + ".json")
    with file_lock(record.with_suffix(".lock")):
        before = _stats(path)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(record.read_text())
            if before and saved["path"] == str(path) and saved["stats"] == before:
                return str(saved["digest"])
        digest = sha256_path(path)
        # The stats from before hashing: a file written meanwhile no longer matches them, so it is hashed next time.
        atomic_write_text(record, json.dumps({"path": str(path), "stats": before, "digest": digest}))
        return digest


def digest_tree(
    path: str | os.PathLike[str], *, each: bool = True, whole: bool = True
) -> tuple[str, dict[str, tuple[int, str]]]:
    """:func:`sha256_path` of ``path`` and, from the same single read, ``{relative name: (size, sha256 hex)}``.

    The per-file digests let a check name which file of an artifact changed, and
    compare sizes before hashing anything. ``each=False`` skips them (``{}``), and
    ``whole=False`` the tree's digest (``""``): a second hash of every byte is not
    free on a multi-GB model.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted(
            (p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()
        )
    else:
        raise FileNotFoundError(f"Cannot digest {str(path)!r}: no such file or directory")
    per_file: dict[str, tuple[int, str]] = {}
    for rel, p in files:
        h.update(rel.encode() + b"\0")
        one, size = hashlib.sha256() if each else None, 0
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                if whole:
                    h.update(chunk)
                size += len(chunk)
                if one is not None:
                    one.update(chunk)
        h.update(b"\0")
        if one is not None:
            per_file[rel] = (size, one.hexdigest())
    return ("sha256:" + h.hexdigest()) if whole else "", per_file


def check_tree(
    directory: str | os.PathLike[str],
    digest: str,
    expected: Mapping[str, tuple[int, str]] | None = None,
    *,
    trust_stats: bool = True,
) -> list[str]:
    """The files under ``directory`` whose bytes are not the ones ``digest`` names; ``[]`` when it is intact.

    ``expected`` (``{name: (size, sha256 hex)}``, from an artifact's manifest, written
    from the same bytes as ``digest``) names the very files that differ, and is all
    that is compared; without it (a manifest of an earlier aiplane) the tree's
    digest is, and every file is named. A check that finds the
    tree intact leaves a record of each file's size, mtime, ctime and inode beside
    it, and the next check with ``trust_stats`` hashes nothing while those hold:
    any write to a file moves its ctime, which no user can set back. ``trust_stats=False``
    hashes regardless (before an entry is published over, or trusted by a new copy).
    """
    directory = Path(directory)
    record = _check_record(directory)
    before = _stats(directory)
    if trust_stats:
        with contextlib.suppress(OSError, ValueError):
            if before and json.loads(record.read_text()) == before:
                return []
    if not directory.is_dir():
        return sorted(expected or ()) or ["(no files)"]
    if expected is not None:
        _, got = digest_tree(directory, whole=False)
        bad = sorted(n for n in {*expected, *got} if tuple(expected.get(n) or ()) != got.get(n))
    else:
        bad = [] if digest_tree(directory, each=False)[0] == digest else sorted(before) or ["(no files)"]
    if bad:
        forget_check(directory)
        return bad
    # The stats from before hashing: a file written meanwhile no longer matches them, so it is hashed next time.
    atomic_write_text(record, json.dumps(before))
    return []


def forget_check(directory: str | os.PathLike[str]) -> None:
    """Drop the record :func:`check_tree` keeps for ``directory``, so its next check hashes every file."""
    with contextlib.suppress(FileNotFoundError):
        _check_record(Path(directory)).unlink()


def _check_record(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.verified"


def _stats(path: Path) -> dict[str, list[int]]:
    """Size, mtime, ctime and inode of the file ``path`` or of each file under the directory ``path``, by name."""
    files = [(path.name, path)] if path.is_file() else [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*"))]
    out = {}
    for name, p in files:
        if p.is_file():
            st = p.stat()
            out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if need be) across processes, until the block ends.

    The file is opened without inheritance (Python's default), so a process started
    under the lock, a server that outlives it, never holds it.
    """
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a file so readers see the old content or the new, never a mix."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so readers see the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp makes the file 0600; published files are meant to be read by others.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # interrupted too: no temporary file left behind; re-raised
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
