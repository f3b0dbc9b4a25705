"""``python -m revline.sinks.erp prepare DIR`` | ``serve DIR [--port N]``: a local Tryton.

For the demo and the tests.
"""

import sys

from revline.sinks.erp._tryton_setup import main

sys.exit(main())
