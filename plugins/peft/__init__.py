"""The ``peft`` plugin: the built-in base model and the ``lora``, ``sft`` and ``distill`` trainers (one training loop)."""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_resolve_base_model", "aiplane_base_model_config", "aiplane_base_model_weights", "aiplane_trainers"]


@hookimpl
def aiplane_resolve_base_model(uri, home, s3):
    from .base_model import resolve

    return resolve(uri, home, s3)


@hookimpl
def aiplane_base_model_config(uri, home, s3):
    from .base_model import config

    return config(uri, home, s3)


@hookimpl
def aiplane_base_model_weights(uri, home):
    from .base_model import weights

    return weights(uri, home)


@hookimpl
def aiplane_trainers():
    # trainer.py imports only pydantic and aiplane.core, so listing trainers stays cheap.
    from .trainer import DistillTrainer, LoraTrainer, SftTrainer

    return [LoraTrainer, SftTrainer, DistillTrainer]
