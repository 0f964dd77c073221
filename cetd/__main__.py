"""``python -m cetd`` runs the `cetd` command."""

import sys

from cetd.cli.daemon_main import main

sys.exit(main())
