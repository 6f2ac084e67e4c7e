"""TEST-ONLY fault injection for the crash-and-resume tests. Does nothing unless the environment
variable ``NANOSEEK_FAULT`` is set, e.g.::

    NANOSEEK_FAULT=kill_in_checkpoint:8   # SIGKILL ourselves half-way through writing step 8's checkpoint
    NANOSEEK_FAULT=kill_at_step:6         # SIGKILL ourselves just before step 6 runs

SIGKILL (not an exception) so that no ``finally``/cleanup code runs: the process dies exactly like
it would on a power cut or an OOM kill.
"""

from __future__ import annotations

import os
import signal


def maybe_fault(point: str, step: int) -> None:
    """SIGKILL this process if ``NANOSEEK_FAULT`` is ``{point}:{step}``."""
    spec = os.environ.get("NANOSEEK_FAULT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
