"""aiplane.core: records, hooks, plugin manager, deployment config, workloads and placement.

Imports no engine and no orchestrator, so it loads inside Ray workers and KFP
containers where only the workload's own libraries are installed.
"""

from .components import Engine, FactsheetPublisher, FeatureStore, ServingTarget, Trainer
from .config import Deployment, SecretRef, Target, load_deployment
from .errors import AiplaneError, ConfigError, InputError, PlacementError, PluginError, WorkloadCancelled, WorkloadError
from .hookspecs import hookimpl
from .placement import Requirements, place
from .plugins import Registry, get_plugin_manager, materialization
from . import records as _records
from .records import *  # noqa: F403  # the records are the core's vocabulary: all of records.__all__, listed once there
from .workload import Resources, Workload, WorkloadContext, WorkloadResult

__version__ = "0.1.0"

__all__ = [
    "hookimpl",
    "get_plugin_manager",
    "Registry",
    "materialization",
    "Deployment",
    "Target",
    "SecretRef",
    "load_deployment",
    "Requirements",
    "place",
    "Workload",
    "WorkloadContext",
    "WorkloadResult",
    "Resources",
    "Engine",
    "FeatureStore",
    "Trainer",
    "ServingTarget",
    "FactsheetPublisher",
    "AiplaneError",
    "ConfigError",
    "PluginError",
    "PlacementError",
    "InputError",
    "WorkloadError",
    "WorkloadCancelled",
    *_records.__all__,
]
