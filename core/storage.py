"""Storage by URI: ``file://`` on this machine's disk, ``s3://bucket/prefix`` on any S3-compatible store.

One filesystem layer, :mod:`pyarrow.fs`, serves both. It is already here for
Iceberg (pyiceberg's default FileIO is built on it), so tables and artifacts share
one client, one set of S3 settings and one tested path; its S3 client does
multipart uploads natively and talks to IBM Cloud Object Storage, MinIO and AWS
alike. pyarrow is imported when storage is first used, never when this module is.

Credentials are references (:class:`~aiplane.core.config.SecretRef`), resolved in
the process that opens the filesystem: a Ray worker or a KFP pod in another cloud
needs the bucket's credentials in its environment, never the orchestrator's disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

from .artifacts import atomic_write_bytes, check_tree, digest_tree, forget_check, sha256_path
from .config import S3Settings
from .errors import ConfigError, InputError

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "S3Settings", "Storage", "ArtifactStore", "normalize_uri", "is_local", "is_artifact", "local_path", "COMPLETE_SUFFIX",
    "QUARANTINE",
]

COMPLETE_SUFFIX = ".complete"
"""An artifact ``<kind>/<hex>`` is complete when the object ``<kind>/<hex>.complete`` exists; it is written last."""
QUARANTINE = ".quarantine"
"""Where an entry whose bytes no longer match its digest is moved: ``<kind>/.quarantine/<hex>.<UTC time>``."""
_log = logging.getLogger(__name__)
_T = TypeVar("_T")
# Answers no retry mends: the store is there, and says no. Compared lower-case without spaces and underscores,
# as the SDK writes them either way (NoSuchBucket, NO_SUCH_BUCKET).
_PERMANENT = ("nosuchbucket", "accessdenied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch", "doesnotexist",
              "notfound")  # fmt: skip
_SCHEMES = ("file", "s3")
_DOWNLOAD_CHUNK = 16 << 20
_CHUNK = 8 << 20


def normalize_uri(uri: str | os.PathLike[str]) -> str:
    """``file:///abs/path`` for a path or ``file://`` URI, ``s3://bucket/prefix`` unchanged; others rejected."""
    text = str(uri)
    if "://" not in text:
        return Path(text).expanduser().absolute().as_uri()
    scheme = text.split("://", 1)[0].lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"Storage URI {text!r}: no storage handles the scheme {scheme!r}; use a local path, file://... or s3://bucket/prefix"
        )
    if scheme == "file":
        return Path(urlparse(text).path).absolute().as_uri()
    parsed = urlparse(text)
    if not parsed.netloc:
        raise ConfigError(f"Storage URI {text!r} names no bucket; write s3://bucket/prefix")
    return f"s3://{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def within(uri: str, root: str) -> bool:
    """Whether ``uri`` is ``root`` or lies under it (both normalized; ``ConfigError`` for a scheme nobody handles)."""
    uri, root = normalize_uri(uri), normalize_uri(root)
    return uri == root or uri.startswith(root.rstrip("/") + "/")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def is_artifact(uri: str) -> bool:
    """Whether ``uri`` names an entry of an :class:`ArtifactStore` (``<root>/<kind>/<sha256 hex>``)."""
    return re.fullmatch(r"[0-9a-f]{64}", normalize_uri(uri).rstrip("/").rsplit("/", 1)[-1]) is not None


def local_path(uri: str) -> Path:
    """The path of a local URI (``file://`` or a plain path)."""
    return Path(urlparse(uri).path if uri.startswith("file://") else uri).expanduser()


class Storage:
    """A filesystem for URIs of one scheme; one instance opens each client once.

    ``routes`` maps roots to the S3 settings that reach them (a region's own store,
    in another cloud); every other ``s3://`` URI is reached with ``s3``.

    What writes to object storage (uploads, the marker) is retried after each of
    :attr:`retry_delays` when it fails in a way a retry may mend (no connection, a
    5xx, a throttle), on top of the S3 client's own few quick retries: an outage of
    some seconds does not throw away the training whose result is being published.
    """

    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Seconds to wait before each retry of a failed write to object storage."""

    def __init__(self, s3: S3Settings | None = None, routes: Mapping[str, S3Settings] | None = None):
        self.s3 = s3
        # The most specific root first: a route under another route wins for what it holds.
        self.routes = sorted(((normalize_uri(r), s) for r, s in (routes or {}).items()), key=lambda rs: -len(rs[0]))
        self._s3fs: dict[int, pyarrow.fs.FileSystem] = {}

    def settings_for(self, uri: str) -> S3Settings | None:
        """The S3 settings that reach ``uri``: its route's, else :attr:`s3`."""
        uri = normalize_uri(uri)
        return next((s for root, s in self.routes if within(uri, root)), self.s3)

    def filesystem(self, uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
        """The filesystem that holds ``uri`` and the path within it."""
        from pyarrow import fs

        uri = normalize_uri(uri)
        if uri.startswith("file://"):
            return fs.LocalFileSystem(), str(local_path(uri))
        settings = self.settings_for(uri)
        if id(settings) not in self._s3fs:
            self._s3fs[id(settings)] = fs.S3FileSystem(**(settings or S3Settings()).pyarrow_kwargs())
        return self._s3fs[id(settings)], uri.removeprefix("s3://")

    def exists(self, uri: str, retry: bool = False) -> bool:
        """Whether the object or file is there; ``retry``: as a write is retried (for a publish's own reads)."""
        from pyarrow import fs

        filesystem, path = self.filesystem(uri)
        return self._call(uri, lambda: bool(filesystem.get_file_info(path).type != fs.FileType.NotFound), retry)

    def read_bytes(self, uri: str) -> bytes:
        filesystem, path = self.filesystem(uri)

        def read() -> bytes:
            # A random-access file knows its size, so S3 answers one GET for the whole object;
            # a stream reads it in growing chunks, a request each (nearly 10x slower for 10 MB).
            with filesystem.open_input_file(path) as f:
                data: bytes = f.read()
            return data

        return self._call(uri, read)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write one object. On S3 a PUT is all or nothing; locally the file is replaced atomically."""
        filesystem, path = self.filesystem(uri)
        if is_local(normalize_uri(uri)):
            atomic_write_bytes(path, data)
            return

        def write() -> None:
            with filesystem.open_output_stream(path) as f:
                f.write(data)

        self._call(uri, write, retry=True)

    def list_files(self, uri: str, retry: bool = False) -> list[tuple[str, int, int]]:
        """``(relative name, size, modification time in ns)`` of every file under ``uri``, sorted; ``[]`` if none."""
        from pyarrow import fs

        filesystem, root = self.filesystem(uri)
        selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = self._call(uri, lambda: filesystem.get_file_info(selector), retry)
        return sorted(
            (i.path.removeprefix(root).lstrip("/"), i.size, i.mtime_ns or 0) for i in infos if i.type == fs.FileType.File
        )

    def delete(self, uri: str) -> None:
        """Remove one object or file; a missing one is not an error."""
        filesystem, path = self.filesystem(uri)
        if self.exists(uri, retry=True):
            self._call(uri, lambda: filesystem.delete_file(path), retry=True)

    def sha256(self, uri: str, retry: bool = False) -> str:
        """The sha256 hex digest of one object or file, streamed: its bytes are hashed, not kept."""
        filesystem, path = self.filesystem(uri)

        def digest() -> str:
            h = hashlib.sha256()
            with filesystem.open_input_file(path) as f:
                while chunk := f.read(_DOWNLOAD_CHUNK):
                    h.update(chunk)
            return h.hexdigest()

        return self._call(uri, digest, retry)

    def move_dir(self, uri: str, to: str) -> None:
        """Move everything under ``uri`` to ``to``: a rename on disk; on S3 a server-side copy, then a delete."""
        filesystem, path = self.filesystem(uri)
        _, target = self.filesystem(to)
        if is_local(normalize_uri(uri)):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # gone already: moved by a concurrent caller, or deleted
                os.rename(path, target)
            return
        names = [name for name, _, _ in self.list_files(uri, retry=True)]
        self._each(uri, names, lambda n: filesystem.copy_file(f"{path}/{n}", f"{target}/{n}"), retry=True)
        self._each(uri, names, lambda n: filesystem.delete_file(f"{path}/{n}"), retry=True)

    def upload_dir(self, local: Path, uri: str) -> list[str]:
        """Copy every file under ``local`` to ``uri``, keeping relative names; returns them, sorted."""
        filesystem, path = self.filesystem(uri)
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        local_fs = is_local(normalize_uri(uri))

        def copy(name: str) -> None:
            if local_fs:
                filesystem.create_dir(f"{path}/{name}".rsplit("/", 1)[0], recursive=True)
            # Streamed: a multi-GB weights file never sits in memory; S3 gets a multipart upload.
            with open(local / name, "rb") as src, filesystem.open_output_stream(f"{path}/{name}") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)

        self._each(uri, names, copy, retry=True)
        return names

    def download_dir(self, uri: str, local: Path) -> None:
        """Copy everything under ``uri`` into the (new) directory ``local``."""
        filesystem, path = self.filesystem(uri)
        local.mkdir(parents=True, exist_ok=True)

        def copy(name: str) -> None:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            # A random-access file, read in large chunks: one ranged GET per chunk. pyarrow's
            # copy_files reads S3 as a stream, about 10x slower (8.6 s vs 0.8 s for 128 MiB on moto).
            with filesystem.open_input_file(f"{path}/{name}") as src, open(local / name, "wb") as dst:
                while chunk := src.read(_DOWNLOAD_CHUNK):
                    dst.write(chunk)

        self._each(uri, [name for name, _, _ in self.list_files(uri)], copy)

    def fetch_tree(self, uri: str, digest: str, cache: str | os.PathLike[str]) -> Path:
        """A local copy of the directory at ``uri``, kept in ``cache`` under its digest.

        Downloaded once per digest, checked against it (a changed object is refused,
        not served), and put in place by a rename, so concurrent fetches are safe.
        A copy already here is checked too (:func:`~aiplane.core.artifacts.check_tree`:
        hashed once, then trusted while its files' stats hold); one that changed is
        dropped and downloaded again. A local ``uri`` is its own copy.
        """
        uri = normalize_uri(uri)
        if is_local(uri):
            return local_path(uri)
        hex_digest = digest.removeprefix("sha256:")
        final = Path(cache).expanduser().absolute() / hex_digest
        if final.is_dir():
            changed = check_tree(final, f"sha256:{hex_digest}")
            if not changed:
                return final
            _log.warning("the cached copy %s of %s changed (%s); downloading it again", final, uri, ", ".join(changed))
            forget_check(final)
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{hex_digest}."))
        try:
            self.download_dir(uri, tmp)
            got = sha256_path(tmp)
            if got != f"sha256:{hex_digest}":
                raise InputError(f"{uri!r} does not match its digest {digest} (got {got}); it was altered in the store.")
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        check_tree(final, f"sha256:{hex_digest}")  # hashed again once, so later fetches trust its stats
        return final

    def _each(self, uri: str, names: list[str], copy: Callable[[str], object], retry: bool = False) -> None:
        """``copy(name)`` for every name, concurrently; the first failure is raised, explained.

        Concurrently: the small files (config, tokenizer) ride along with the weights'
        transfer instead of each waiting a round trip after it. pyarrow releases the GIL.
        """
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(8, len(names))), thread_name_prefix="aiplane-storage") as pool:
            for done in [pool.submit(self._call, uri, lambda n=name: copy(n), retry) for name in names]:
                done.result()

    def _call(self, uri: str, fn: Callable[[], _T], retry: bool = False) -> _T:
        """``fn()``; an OSError becomes an explained :class:`InputError`, after the retries a write to S3 gets."""
        delays = list(self.retry_delays) if retry and not is_local(normalize_uri(uri)) else []
        for attempt in range(len(delays) + 1):
            try:
                return fn()
            except OSError as exc:
                if attempt == len(delays) or not _transient(exc):
                    tries = f" (tried {attempt + 1} times)" if attempt else ""
                    raise InputError(f"Storage {uri!r}{tries}: {_explain(exc, self.settings_for(uri))}") from None
                _log.warning("storage %s: %s; retrying in %gs", uri, _explain(exc, None), delays[attempt])
                time.sleep(delays[attempt])
        raise AssertionError("unreachable: the last attempt returns or raises")


def _transient(exc: OSError) -> bool:
    """Whether a retry may mend ``exc``: not when the store answered no (a missing bucket, a refused key)."""
    text = re.sub(r"[\s_]", "", str(exc).lower())
    return not any(p in text for p in _PERMANENT)


def _explain(exc: OSError, s3: S3Settings | None) -> str:
    """The store's complaint, with what to do for the common ones; never a credential's value."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "NoSuchBucket" in text or ("bucket" in text.lower() and "not found" in text.lower()):
        # pyarrow suggests letting it create buckets; a deployment should name one that exists.
        return f"{text.split('. To create buckets', 1)[0]}. Create the bucket, or fix the bucket name in the deployment."
    if "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        refs = ", ".join(repr(r) for r in (s3.access_key_id, s3.secret_access_key) if r) if s3 else ""
        refs = refs or "of storage.s3 (or of the region's own store)"
        return f"{text}. Check the credentials {refs} and that they may read and write the bucket."
    if "Path does not exist" in text or "not found" in text.lower():
        return f"{text}."
    return text


class ArtifactStore:
    """Immutable, content-addressed artifacts under a root URI: ``<root>/<kind>/<sha256 hex>/...``.

    Object storage has no rename, so completeness is a marker: the files go under
    their digest first, then ``<kind>/<hex>.complete`` (a manifest) is written
    last. Readers trust only complete entries, so a publish that crashed leaves
    nothing a reader can see.

    An entry is the artifact its digest names, or it is not used. The manifest
    holds each file's size and sha256, so a check hashes each file once and
    names the one that changed. Publishing over an existing entry checks it
    against the bytes being published; :meth:`fetch` checks a local entry (and
    a cached copy of a remote one) before handing it out. An entry found altered
    is moved aside to ``<kind>/.quarantine/`` and, on publish, replaced from the
    freshly staged copy; a fetch refuses it, naming it.
    """

    def __init__(self, root: str | os.PathLike[str], s3: S3Settings | None = None, storage: Storage | None = None):
        self.root = normalize_uri(root)
        self.storage = storage or Storage(s3)

    def uri_for(self, kind: str, digest: str) -> str:
        return f"{self.root}/{kind}/{digest.removeprefix('sha256:')}"

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh local directory to write an artifact into; removed when the block ends."""
        base = local_path(self.root) / ".staging" if is_local(self.root) else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="aiplane-stage-", dir=base))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staged: str | os.PathLike[str], kind: str, log: Callable[[str], None] | None = None) -> tuple[str, str]:
        """Store the files of a staged directory; returns ``(uri, digest)``.

        Idempotent for an intact entry. An entry of the same digest whose bytes
        differ is quarantined and published again from ``staged``; ``log`` hears of it.
        """
        staged = Path(staged)
        digest, files = digest_tree(staged)
        uri = self.uri_for(kind, digest)
        complete = self.storage.exists(uri + COMPLETE_SUFFIX, retry=True)
        # Unfinished uploads are simply overwritten; on disk, what sits at the final path must be right or go.
        existing = self._differences(uri, digest, files) if complete or is_local(self.root) else None
        if existing == []:
            if not complete:
                self._write_manifest(uri, kind, digest, files)
            return uri, digest
        if existing:
            moved = self._quarantine(uri)
            (log or _log.warning)(
                f"artifact {uri} did not match its digest ({', '.join(existing)} changed); moved it aside to {moved} "
                "and published it again from the new copy"
            )
        if is_local(self.root):
            final = local_path(uri)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Locally a rename puts the whole tree in place at once; a racing publisher of the
            # same bytes may have won, which is the same content.
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            shutil.copytree(staged, tmp, dirs_exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            self.storage.upload_dir(staged, uri)
        self._write_manifest(uri, kind, digest, files)
        return uri, digest

    def complete(self, uri: str) -> bool:
        """Whether the artifact at ``uri`` was published whole."""
        return self.storage.exists(normalize_uri(uri) + COMPLETE_SUFFIX)

    def fetch(self, uri: str, cache: str | os.PathLike[str]) -> Path:
        """A local directory holding the artifact at ``uri``, checked against its digest: itself when local,
        else a cached copy.

        The copy is downloaded once per digest into ``cache``, checked against
        the digest, and put in place by a rename, so concurrent fetches are safe.
        A local entry whose bytes changed is quarantined and refused
        (:class:`InputError` naming it and what to do).
        """
        uri = normalize_uri(uri)
        kind, hex_digest = uri.rsplit("/", 2)[-2:]
        digest = f"sha256:{hex_digest}"
        if not self.complete(uri):
            raise InputError(
                f"Artifact {uri!r} is not complete (no {COMPLETE_SUFFIX} marker): it was never published, or its "
                f"publish did not finish{self._quarantined_note(uri)}. Re-materialize it (aiplane up --force)."
            )
        if not is_local(uri):
            return self.storage.fetch_tree(uri, digest, Path(cache) / kind)
        changed = check_tree(local_path(uri), digest, self._manifest_files(uri))
        if changed:
            moved = self._quarantine(uri)
            raise InputError(
                f"Artifact {uri!r} is not the artifact its digest names: {', '.join(changed)} changed after it was "
                f"published. It was moved aside to {moved} and is not used. Publish it again (aiplane up --force "
                "trains and publishes it anew), or roll back to another one."
            )
        return local_path(uri)

    def verify(self, uri: str) -> list[str]:
        """The files of the complete entry at ``uri`` whose bytes are not the ones its digest names; ``[]`` when
        it is intact. Hashes the whole entry, streamed from object storage: for a serving target that hands the
        URI to a server which fetches it itself (KServe's storage initializer), before it does so."""
        uri = normalize_uri(uri)
        digest = f"sha256:{uri.rsplit('/', 1)[-1]}"
        if not self.complete(uri):
            raise InputError(f"Artifact {uri!r} is not complete (no {COMPLETE_SUFFIX} marker){self._quarantined_note(uri)}.")
        files = self._manifest_files(uri)
        if is_local(uri):
            return check_tree(local_path(uri), digest, files, trust_stats=False)
        if files is None:  # a manifest of an earlier aiplane: the tree's digest, from a copy
            with tempfile.TemporaryDirectory(prefix="aiplane-verify-") as tmp:
                self.storage.download_dir(uri, Path(tmp))
                return [] if sha256_path(tmp) == digest else sorted(n for n, _, _ in self.storage.list_files(uri))
        return self._differences(uri, digest, files) or []

    def _manifest_files(self, uri: str) -> dict[str, tuple[int, str]] | None:
        """``{name: (size, sha256)}`` from the entry's manifest; ``None`` for one written before manifests held them."""
        manifest = json.loads(self.storage.read_bytes(uri + COMPLETE_SUFFIX))
        if "sha256" not in manifest:
            return None
        return {name: (manifest["sizes"][name], hex_) for name, hex_ in manifest["sha256"].items()}

    def _write_manifest(self, uri: str, kind: str, digest: str, files: Mapping[str, tuple[int, str]]) -> None:
        manifest = {
            "digest": digest,
            "kind": kind,
            "files": sorted(files),
            "sizes": {name: size for name, (size, _) in files.items()},
            "sha256": {name: hex_ for name, (_, hex_) in files.items()},
        }
        self.storage.write_bytes(uri + COMPLETE_SUFFIX, json.dumps(manifest, sort_keys=True).encode())

    def _differences(self, uri: str, digest: str, files: Mapping[str, tuple[int, str]]) -> list[str] | None:
        """The files of the entry at ``uri`` that differ from ``files``: ``None`` when nothing is there,
        ``[]`` when it holds exactly those bytes. Hashes the entry whole, trusting no earlier check."""
        if is_local(uri):
            path = local_path(uri)
            return check_tree(path, digest, files, trust_stats=False) if path.exists() else None
        listed = {name: size for name, size, _ in self.storage.list_files(uri, retry=True)}
        if not listed:
            return None
        differ = {name for name in {*listed, *files} if listed.get(name) != (files.get(name) or (None,))[0]}
        # Sizes first: only a file of the right size needs its bytes read.
        differ |= {name for name in set(files) - differ if self.storage.sha256(f"{uri}/{name}", retry=True) != files[name][1]}
        return sorted(differ)

    def _quarantine(self, uri: str) -> str:
        """Move the entry at ``uri`` aside (its marker first, so no reader trusts it meanwhile); its new URI."""
        kind_root, hex_digest = uri.rsplit("/", 1)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = f"{kind_root}/{QUARANTINE}/{hex_digest}.{stamp}"
        self.storage.delete(uri + COMPLETE_SUFFIX)
        if is_local(uri):
            forget_check(local_path(uri))
        self.storage.move_dir(uri, moved)
        return moved

    def _quarantined_note(self, uri: str) -> str:
        if not is_local(uri):
            return ""
        kind_root, hex_digest = local_path(uri).parent, local_path(uri).name
        found = sorted((kind_root / QUARANTINE).glob(f"{hex_digest}.*"))
        return f"; an altered copy was moved aside to {found[-1]}" if found else ""
