"""Imported only in the CPU workers' forkserver (muse.pools.local preloads it, first): the server's drain
must outlive a SIGTERM sent to its whole process group (a service manager's stop), as the workers do
(muse.worker.main ignores it too). The forkserver still exits once the server is gone: it watches a
pipe from it. Never import this module anywhere else."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
