"""The ``local`` plugin: the subprocess engine."""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_engines"]


@hookimpl
def aiplane_engines():
    from .engine import LocalEngine

    return [LocalEngine]
