"""``python -m susc_callback`` is the ``susc`` command."""

import sys

from susc_callback.cli import main

sys.exit(main())
