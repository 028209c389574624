"""`python -m erase.cli`: erase-concept."""

import sys

from erase.cli.concept import main

sys.exit(main())
