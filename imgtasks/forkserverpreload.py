"""The workers' fork server's one preload (``workerstart.PRELOAD``): what every worker
needs, imported once before the server forks any. Imported by the fork server only; never
import it anywhere else: it makes the process exit without finalizing.

- The garbage collector is off while the modules import: their objects all live as long
  as the process, so the collections that their allocations trigger free nothing. They
  cost 0.13-0.24 s of the ~1.05 s of CPU these imports take (3 runs each way).
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

gc.disable()
try:
    import distributed  # noqa: F401

    import imgtasks.cluster
    import imgtasks.nodes  # noqa: F401
finally:
    gc.freeze()
    gc.enable()
atexit.register(os._exit, 0)
