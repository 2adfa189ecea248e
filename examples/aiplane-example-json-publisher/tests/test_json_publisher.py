from aiplane.testing import check_factsheet_publisher
from aiplane_example_json import JsonFactsheetPublisher


def test_json_publisher_keeps_the_factsheet_publisher_contract(tmp_path):
    check_factsheet_publisher(JsonFactsheetPublisher, {"directory": str(tmp_path / "factsheets")}, tmp_path)
