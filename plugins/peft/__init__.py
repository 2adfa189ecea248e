"""The ``peft`` plugin: the built-in base model and the ``lora`` trainer."""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_resolve_base_model"]


@hookimpl
def aiplane_resolve_base_model(uri, home):
    from .base_model import resolve

    return resolve(uri, home)
