"""The ``factsheets`` plugin: the ``local`` factsheet publisher (JSON + HTML page + loss chart in a directory)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiplane.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from aiplane.core.components import FactsheetPublisher

__all__ = ["aiplane_factsheet_publishers"]


@hookimpl
def aiplane_factsheet_publishers() -> list[type[FactsheetPublisher]]:
    from .publisher import LocalFactsheetPublisher

    return [LocalFactsheetPublisher]
