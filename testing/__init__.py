"""``aiplane.testing``: the plugin contract as checks a third-party package runs in its own pytest suite.

Each ``check_*`` drives one component kind through its contract on this machine (no cluster) and raises
:class:`ConformanceError` (an ``AssertionError``) whose message says which promise was broken::

    from aiplane.testing import check_serving_target

    def test_my_target_keeps_the_contract(tmp_path):
        check_serving_target(MyTarget, {"directory": str(tmp_path / "endpoints")}, tmp_path)

The inputs a check hands the component (records over small local files, feature rows, a factsheet
document) come from :mod:`aiplane.testing.fixtures`. Imports ``aiplane.core`` only.
"""

from ._common import ConformanceError
from .engines import check_engine
from .publishers import check_factsheet_publisher
from .serving import check_serving_target
from .stores import check_feature_store
from .trainers import check_trainer

__all__ = [
    "ConformanceError",
    "check_engine",
    "check_feature_store",
    "check_trainer",
    "check_serving_target",
    "check_factsheet_publisher",
]
