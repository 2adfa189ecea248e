from aiplane.testing import check_serving_target
from aiplane_example_http import HttpServingTarget


def test_http_target_keeps_the_serving_target_contract(tmp_path):
    check_serving_target(HttpServingTarget, {"directory": str(tmp_path / "endpoints")}, tmp_path)
