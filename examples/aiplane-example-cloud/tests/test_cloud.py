from aiplane.testing import check_engine
from aiplane_example_cloud import ExampleCloudEngine


def test_example_cloud_engine_keeps_the_engine_contract(tmp_path):
    check_engine(ExampleCloudEngine, {"project": "demo"}, tmp_path)
