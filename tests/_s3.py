"""A real S3 HTTP endpoint on loopback for tests: moto's server mode on ``127.0.0.1``, a free port.

Clients talk to it over HTTP exactly as they would to AWS S3 or IBM Cloud Object
Storage; nothing is patched in-process. Use it as a context manager::

    with s3_server() as s3:
        s3.create_bucket("features")
        fs = s3.pyarrow_filesystem()                    # pyarrow.fs.S3FileSystem
        props = s3.pyiceberg_properties()               # s3.* FileIO properties for pyiceberg
        opts = s3.fsspec_storage_options()              # storage_options for s3fs / fsspec

The client settings that work (and that an S3-compatible service such as IBM COS
needs too) are those the three methods return: an explicit endpoint URL with its
``http://`` scheme, path-style addressing (the bucket is not a host name on
loopback), an explicit region (pyiceberg otherwise asks AWS for the bucket's
region) and any access key pair (moto accepts every signature).

moto keeps its state in process-wide backends, so servers started in one process
share buckets; each server resets that state when the last one still running stops.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["S3Server", "s3_server", "dead_endpoint"]

_running = 0
_running_lock = threading.Lock()


@dataclass(frozen=True)
class S3Server:
    """Where a running :func:`s3_server` listens, and the credentials it accepts."""

    endpoint_url: str
    """``http://127.0.0.1:<port>``: give it whole (scheme included) to every client."""
    access_key_id: str = "aiplane-test-key"
    secret_access_key: str = "aiplane-test-secret"
    region: str = "us-east-1"

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when ``name`` is omitted) and return its name."""
        name = name or f"aiplane-{uuid.uuid4().hex[:12]}"
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def boto3_client(self) -> Any:
        """A boto3 S3 client for this server (boto3 comes with moto)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )

    def pyarrow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pyarrow.fs.S3FileSystem`` that reach this server."""
        return {
            "endpoint_override": self.endpoint_url,  # the scheme in the URL selects plain HTTP
            "access_key": self.access_key_id,
            "secret_key": self.secret_access_key,
            "region": self.region,
            "force_virtual_addressing": False,  # path-style: http://host:port/bucket/key
        }

    def pyarrow_filesystem(self) -> Any:
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(**self.pyarrow_kwargs())

    def pyiceberg_properties(self) -> dict[str, str]:
        """pyiceberg FileIO properties (catalog or table config) for a warehouse on this server.

        ``s3.region`` is required: without it pyiceberg's PyArrowFileIO resolves the
        bucket's region by asking AWS, which no loopback (or IBM COS) bucket answers.
        """
        return {
            "s3.endpoint": self.endpoint_url,
            "s3.access-key-id": self.access_key_id,
            "s3.secret-access-key": self.secret_access_key,
            "s3.region": self.region,
            "s3.force-virtual-addressing": "false",
        }

    def fsspec_storage_options(self) -> dict[str, Any]:
        """``storage_options`` for ``fsspec.filesystem("s3", ...)`` (s3fs), path-style."""
        return {
            "key": self.access_key_id,
            "secret": self.secret_access_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on ``127.0.0.1`` (a free port), yield its :class:`S3Server`, stop it on exit."""
    global _running
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")
    if werkzeug_log.level == logging.NOTSET:
        # One line per S3 request on stderr otherwise; pytest shows them with every failure.
        werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    with _running_lock:
        _running += 1
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        try:
            with _running_lock:
                _running -= 1
                last = _running == 0
            if last:
                # moto's backends are process-wide: forget every bucket once no server is left to serve them.
                request = urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")
                with urllib.request.urlopen(request, timeout=10):
                    pass
        finally:
            server.stop()


def dead_endpoint() -> str:
    """An S3 endpoint URL nothing listens on: a client sent there fails at once (connection refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
