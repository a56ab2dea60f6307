"""``python -m atoll``: the same as the ``atoll`` command."""

import sys

from ._cli import main

sys.exit(main())
