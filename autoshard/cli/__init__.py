"""The ``autoshard`` command line: ``plan``, ``show``, ``compare``, ``calibrate``."""
