"""Fault injection for the crash-and-resume tests and the guard drill. Does nothing unless the
environment variable ``NANOSEEK_FAULT`` is set, e.g.::

    NANOSEEK_FAULT=kill_in_checkpoint:8   # SIGKILL ourselves half-way through writing step 8's checkpoint
    NANOSEEK_FAULT=kill_at_step:6         # SIGKILL ourselves just before step 6 runs
    NANOSEEK_FAULT=nan_loss:6             # guard drill: step 6's loss is multiplied by NaN (once)

SIGKILL (not an exception) so that no ``finally``/cleanup code runs: the process dies exactly like
it would on a power cut or an OOM kill. The NaN drill exercises the training guard's response
(rollback by default) end to end, as a real non-finite loss would.
"""

from __future__ import annotations

import os
import signal

_fired: set[str] = set()  # drills that already fired in this process


def maybe_fault(point: str, step: int) -> None:
    """SIGKILL this process if ``NANOSEEK_FAULT`` is ``{point}:{step}``."""
    spec = os.environ.get("NANOSEEK_FAULT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(step: int) -> bool:
    """True, once per process, when ``NANOSEEK_FAULT`` is ``nan_loss:{step}``: the trainer then
    multiplies that step's loss by NaN (a rolled-back step that runs again is not poisoned again)."""
    spec = f"nan_loss:{step}"
    if os.environ.get("NANOSEEK_FAULT") != spec or spec in _fired:
        return False
    _fired.add(spec)
    return True
