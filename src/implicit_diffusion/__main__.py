"""``python -m implicit_diffusion`` = the ``implicit-diffusion`` command."""

import sys

from .cli import main

sys.exit(main())
