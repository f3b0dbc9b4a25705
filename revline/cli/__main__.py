"""``python -m revline.cli``: the ``revline`` command."""

import sys

from revline.cli import main

sys.exit(main())
