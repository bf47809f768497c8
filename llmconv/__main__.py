"""`python -m llmconv` runs the command line, like the `llmconv` script."""

import sys

from .cli import main

sys.exit(main())
