"""``python -m implicit_diffusion`` = the ``implicit-diffusion`` command."""

import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun the process group is destroyed by now. Leave without the interpreter's
    # teardown, where gloo's worker threads can still abort a finished process (SIGABRT,
    # "terminate called without an active exception"; cf. pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
