"""aiplane.assets: the Dagster code location (``workspace.yaml``, or ``-m aiplane.assets``, loads ``defs``).

Dagster is imported on first use of these names, so ``aiplane plugins`` works
where only the core and some plugins are installed. ``__dir__`` lists them, so
Dagster's module loader (which looks through ``dir(module)``) finds ``defs``.
"""

__all__ = ["defs", "ASSETS", "AiplaneResource", "build_definitions"]


def __getattr__(name: str):
    if name in ("defs", "ASSETS", "build_definitions"):
        from . import definitions

        return getattr(definitions, name)
    if name == "AiplaneResource":
        from .resource import AiplaneResource

        return AiplaneResource
    raise AttributeError(f"module 'aiplane.assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
