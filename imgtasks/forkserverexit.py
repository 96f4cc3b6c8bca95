"""Imported by the workers' fork server only, last of its preloads (``workerstart.PRELOAD``);
never import it anywhere else: it makes the process exit without finalizing.

- ``gc.freeze()``: what the server imported (distributed, our stages, pyarrow) moves to
  the permanent generation, so the workers forked from it never scan those objects in
  their collections (nor touch, and so copy, their pages).
- At exit the server skips the interpreter's finalization over all it imported:
  stopping it (``workerstart.stop_fork_server``, which the command line waits for) took
  0.29 s, all of it tearing those modules down. Its workers always leave by ``os._exit``.
"""

import atexit
import gc
import os

gc.freeze()
atexit.register(os._exit, 0)
