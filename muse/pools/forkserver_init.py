"""Imported only in the CPU workers' forkserver (muse.pools.local preloads it, first).

- SIGTERM is ignored: the server's drain must outlive a SIGTERM sent to its whole process group (a service
  manager's stop), as the workers do (muse.worker.main ignores it too). The forkserver still exits once
  the server is gone: it watches a pipe from it.
- Its exit skips the interpreter's teardown of torch, diffusers and transformers (1.3 s idle, longer on
  a busy machine): its workers die with it (PR_SET_PDEATHSIG, see muse.worker.main.die_with_parent), so a
  killed server's workers must not wait for that. Registered first, this runs after the other exit hooks.

Never import this module anywhere else.
"""

import atexit
import os
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
_forkserver = os.getpid()
atexit.register(lambda: os.getpid() == _forkserver and os._exit(0))
