"""`python -m nanok2`: the same as the `nanok2` command."""
import sys

from nanok2.cli import main

sys.exit(main())
