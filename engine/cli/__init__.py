"""The ``fpengine`` command line: ``app`` holds the group, one module per command family."""
