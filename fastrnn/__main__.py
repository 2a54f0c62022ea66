"""``python -m fastrnn``: the ``fastrnn`` command (``fastrnn.charlm.cli``)."""

import sys

from .charlm.cli import main

sys.exit(main())
