from aiplane.testing import check_feature_store
from aiplane_example_parquet import ParquetFeatureStore


def test_parquet_store_keeps_the_feature_store_contract(tmp_path):
    check_feature_store(ParquetFeatureStore, {"directory": str(tmp_path / "features")}, tmp_path)
