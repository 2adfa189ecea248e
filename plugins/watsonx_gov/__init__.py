"""The ``watsonx_gov`` plugin: the ``watsonx-governance`` factsheet publisher and the ``watsonx_gov`` evaluator.

Publishes each served adapter to IBM watsonx.governance with IBM's own client
(``ibm-aigov-facts-client``): an external model with the factsheet's facts and
attachments, tracked in an AI use case. Importing this module imports neither
the IBM client nor anything heavy; the workload does, when it runs.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .evaluate import WatsonxGovEvaluator
from .publisher import WatsonxGovernancePublisher

__all__ = ["WatsonxGovernancePublisher", "WatsonxGovEvaluator", "aiplane_factsheet_publishers", "aiplane_evaluators"]


@hookimpl
def aiplane_factsheet_publishers() -> list[type[WatsonxGovernancePublisher]]:
    """Provide the ``watsonx-governance`` factsheet publisher."""
    return [WatsonxGovernancePublisher]


@hookimpl
def aiplane_evaluators() -> list[type[WatsonxGovEvaluator]]:
    """Provide the ``watsonx_gov`` evaluator (``trainer.settings.evaluation.watsonx_gov``)."""
    return [WatsonxGovEvaluator]
