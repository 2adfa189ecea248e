"""The ``peft`` plugin: the built-in base model and the ``lora`` trainer."""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_resolve_base_model", "aiplane_trainers"]


@hookimpl
def aiplane_resolve_base_model(uri, home):
    from .base_model import resolve

    return resolve(uri, home)


@hookimpl
def aiplane_trainers():
    # trainer.py imports only pydantic and aiplane.core, so listing trainers stays cheap.
    from .trainer import LoraTrainer

    return [LoraTrainer]
