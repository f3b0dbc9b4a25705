"""``python -m sinks.erp prepare DIR`` | ``serve DIR [--port N]``: a local Tryton for Revline."""

import sys

from sinks.erp._tryton_setup import main

sys.exit(main())
