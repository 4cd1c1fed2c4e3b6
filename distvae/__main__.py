"""`python -m distvae ...` is the same as the `distvae` command."""

import sys

from distvae.cli import main

sys.exit(main())
