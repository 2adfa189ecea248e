"""The ``ray`` plugin: the Ray Train engine (work in progress)."""
