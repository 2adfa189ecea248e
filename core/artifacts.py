"""Content digests and a content-addressed artifact store with atomic publish.

Artifacts are written into a staging directory under the store root, digested,
and renamed into ``<root>/<kind>/<sha256>`` in one ``os.rename``; a reader can
never see a half-written artifact, and publishing the same bytes twice is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["sha256_path", "ArtifactStore", "atomic_write_text"]

_CHUNK = 1 << 20


def sha256_path(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, or of a directory tree (relative names and bytes, sorted)."""
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
    for rel, p in files:
        h.update(rel.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


class ArtifactStore:
    """A directory of immutable, content-addressed artifacts."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, kind: str, digest: str) -> Path:
        return self.root / kind / digest.removeprefix("sha256:")

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory on the store's filesystem; removed unless published."""
        base = self.root / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staged: str | os.PathLike, kind: str) -> tuple[str, str]:
        """Move a staged directory into the store; returns ``(path, digest)``."""
        staged = Path(staged)
        digest = sha256_path(staged)
        final = self.path_for(kind, digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            try:
                os.rename(staged, final)
            except OSError:
                # Another writer published the same bytes first: same digest, same content.
                if not final.exists():
                    raise
                shutil.rmtree(staged, ignore_errors=True)
        return str(final), digest


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp makes the file 0600; published files are meant to be read by others.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
