"""The ``kfp`` plugin: the Kubeflow Pipelines engine (work in progress)."""
