"""``python -m autoshard``: the same as the ``autoshard`` command (see ``autoshard.cli.main``)."""
import sys

from autoshard.cli.main import main

sys.exit(main())
