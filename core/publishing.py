"""What every factsheet publisher shares: its workload, the checks its entry point starts with, publishing a
folder in one step, and bounded retries against a service that may be away.

A publisher's :meth:`~aiplane.core.components.FactsheetPublisher.workload` returns :func:`publish_workload`;
its entry point starts with :func:`publish_inputs`, so a wrong input fails the same way whatever the
publisher. :func:`staged_dir` is the one way aiplane makes a directory appear whole (stage beside it,
rename in one step, keep a concurrent writer's identical result); :class:`Attempts` is the one way a
publish retries a call that found the service unavailable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .errors import AiplaneError, InputError, WorkloadError
from .factsheet import publishable
from .records import EndpointRecord
from .workload import Workload, WorkloadContext

__all__ = ["Attempts", "publish_inputs", "publish_workload", "staged_dir"]

T = TypeVar("T")


def publish_workload(name: str, entrypoint: str, endpoint: Any, document: Any, **params: Any) -> Workload:
    """The publish workload ``name`` running ``entrypoint`` with ``endpoint`` as its input, ``document`` (checked
    with :func:`~aiplane.core.factsheet.publishable`, as plain JSON) and ``params`` as its parameters.

    Parameters travel to wherever the engine runs the workload and are shown in Dagster: a secret goes as its
    reference (a :class:`~aiplane.core.config.SecretRef`, a file path), resolved by the entry point.
    """
    return Workload(
        name=name,
        entrypoint=entrypoint,
        inputs={"endpoint": endpoint},
        params={"document": publishable(endpoint, document), **params},
    )


def publish_inputs(ctx: WorkloadContext) -> tuple[EndpointRecord, Mapping[str, Any]]:
    """The endpoint and the document a publish workload was given; InputError, naming the workload, otherwise."""
    endpoint, document = ctx.inputs.get("endpoint"), ctx.params.get("document")
    what = ctx.workload.name
    if not isinstance(endpoint, EndpointRecord):
        raise InputError(f"{what} needs an 'endpoint' input that is an EndpointRecord; got {endpoint!r:.80}")
    if not isinstance(document, Mapping):
        raise InputError(f"{what} needs a 'document' mapping parameter; got {type(document).__name__}")
    return endpoint, document


@contextmanager
def staged_dir(final: Path, complete: str | None = None, mode: int | None = None) -> Iterator[Path]:
    """A new, empty directory beside ``final`` for the block to fill; renamed to ``final`` in one step when the
    block ends, so a reader finds all of it or none. If a concurrent writer's rename won, its ``final`` is
    kept when it holds ``complete`` (a file name; unset: when it is a directory): both wrote the same name,
    so the same content. ``mode``: the directory's permissions (a staging directory is private). Whatever
    happens, the staging directory is gone afterwards; a block that raises publishes nothing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield staging
        if mode is not None:
            os.chmod(staging, mode)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / complete).is_file() if complete else not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Attempts:
    """Bounded retries of one call to a service at a time: ``attempts`` tries, ``backoff_s`` doubled after each.

    ``refused(exc)`` returns the aiplane error to raise at once (credentials refused, a request the service
    will never take), or None to try again; an aiplane error the call raises is raised at once too. When the
    tries run out: a WorkloadError naming the service, what was being done and the last reason, and saying
    that nothing served changed and how to publish again.
    """

    def __init__(
        self, service: str, attempts: int, backoff_s: float, *, reason: Callable[[BaseException], str],
        refused: Callable[[BaseException, str, str], AiplaneError | None], log: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep, raise_what: str = "the publisher's `attempts`",
    ) -> None:  # fmt: skip
        self.service, self.attempts, self.backoff_s = service, attempts, backoff_s
        self.reason, self.refused, self.log, self.sleep, self.raise_what = reason, refused, log, sleep, raise_what

    def __call__(self, what: str, call: Callable[[], T]) -> T:
        """``call()``'s answer, trying again while the service is unavailable; ``what`` names it in messages."""
        last = ""
        for i in range(self.attempts):
            try:
                return call()
            except AiplaneError:
                raise
            except Exception as exc:  # clients raise their own types for a service away; `refused` sorts them
                last = self.reason(exc)
                error = self.refused(exc, last, what)
                if error is not None:
                    raise error from None
                if i < self.attempts - 1:
                    delay = self.backoff_s * 2**i
                    self.log(f"{self.service}: could not {what} ({last}); trying again in {delay:g}s")
                    self.sleep(delay)
        raise WorkloadError(
            f"{self.service} did not answer usably after {self.attempts} attempts to {what} (last: {last}). "
            "Nothing served was changed; publish the factsheet again (re-materialize the factsheet asset) once it is back, "
            f"or raise {self.raise_what}."
        )
