"""The ``openlineage`` plugin: an observer that emits OpenLineage run events for every materialization.

Each asset materialization becomes an OpenLineage run of the job named after the
asset: START before it is computed, COMPLETE (with the output dataset) or FAIL
(with the error) after. Input and output datasets are derived from the records.
A region's partition is a job of its own, ``<asset>.<region>`` (``adapter_weights.eu``),
so each region's lineage is a graph of its own; the run facet names the region too.

Settings (``observers.openlineage`` in a deployment)::

    observers:
      openlineage:
        namespace: aiplane-local                 # job namespace (default "aiplane")
        path: "{home}/lineage/events.jsonl"      # JSON-lines file (default <home>/lineage/events.jsonl)
        http:                                    # optional: send to a lineage server instead of the file
          url: https://marquez.example.com
          endpoint: api/v1/lineage
          api_key: {env: OPENLINEAGE_API_KEY}    # by reference only
          timeout_s: 5
          retries: 2

Emitting never fails a materialization: a problem is logged as a warning.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiplane.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import Record

__all__ = ["aiplane_before_materialize", "aiplane_after_materialize", "aiplane_on_materialize_error"]

log = logging.getLogger("aiplane.plugins.openlineage")


def _emit(state: str, **kwargs: Any) -> None:
    try:
        from .emitter import emit_safely
    except ImportError as exc:  # the client is an extra; without it the observer only says so
        log.warning("OpenLineage %s event not emitted: %s. Install aiplane[openlineage].", state, exc)
        return
    emit_safely(state, **kwargs)


@hookimpl
def aiplane_before_materialize(
    asset: str, run_id: str, inputs: list[Record], deployment: Deployment, region: str | None
) -> None:
    """Emit START for ``asset``."""
    _emit("START", asset=asset, run_id=run_id, inputs=inputs, deployment=deployment, region=region)


@hookimpl
def aiplane_after_materialize(
    asset: str, run_id: str, inputs: list[Record], output: Record, deployment: Deployment, region: str | None
) -> None:
    """Emit COMPLETE for ``asset``, with ``output`` as its output dataset."""
    _emit("COMPLETE", asset=asset, run_id=run_id, inputs=inputs, deployment=deployment, region=region, output=output)


@hookimpl
def aiplane_on_materialize_error(
    asset: str, run_id: str, inputs: list[Record], error: BaseException, deployment: Deployment, region: str | None
) -> None:
    """Emit FAIL for ``asset``, with the error message and stack trace."""
    _emit("FAIL", asset=asset, run_id=run_id, inputs=inputs, deployment=deployment, region=region, error=error)
