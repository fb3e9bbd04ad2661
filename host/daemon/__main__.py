"""``python -m host.daemon``: ptmigd."""

import sys

from host.daemon.main import main

sys.exit(main())
