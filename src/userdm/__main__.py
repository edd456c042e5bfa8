"""`python -m userdm` is the `userdm` command."""

import sys

from .cli.main import main

sys.exit(main())
