"""``python -m autoshard``: the same as the ``autoshard`` command (see ``autoshard._cli``)."""
import sys

from ._cli import main

sys.exit(main())
