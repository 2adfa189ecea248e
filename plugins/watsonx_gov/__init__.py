"""The ``watsonx_gov`` plugin: the ``watsonx-governance`` factsheet publisher.

Publishes each served adapter to IBM watsonx.governance with IBM's own client
(``ibm-aigov-facts-client``): an external model with the factsheet's facts and
attachments, tracked in an AI use case. Importing this module imports neither
the IBM client nor anything heavy; the workload does, when it runs.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .publisher import WatsonxGovernancePublisher

__all__ = ["WatsonxGovernancePublisher", "aiplane_factsheet_publishers"]


@hookimpl
def aiplane_factsheet_publishers() -> list[type[WatsonxGovernancePublisher]]:
    """Provide the ``watsonx-governance`` factsheet publisher."""
    return [WatsonxGovernancePublisher]
