"""The ``ray`` plugin: the Ray Train engine (a private local Ray, or a cluster through Ray Jobs)."""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_engines"]


@hookimpl
def aiplane_engines():
    # engine.py imports only pydantic and aiplane.core at module level; ray is imported when a run starts.
    from .engine import RayEngine

    return [RayEngine]
