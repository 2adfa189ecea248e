"""aiplane.assets: the Dagster code location (``workspace.yaml`` loads ``defs`` from here)."""

from .definitions import ASSETS, build_definitions, defs
from .resource import AiplaneResource

__all__ = ["defs", "ASSETS", "AiplaneResource", "build_definitions"]
