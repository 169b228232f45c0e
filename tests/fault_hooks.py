"""Run the ``s2l`` command line with one function held at a barrier (for test_faults.py).

``python -c "import fault_hooks; fault_hooks.main()" ARGS...`` runs ``s2l ARGS...`` with
the function named by ``$S2L_PAUSE`` (``"module:name"``) replaced by :func:`paused`: each
call first creates ``$S2L_BARRIER/started-<pid>``, then waits until ``$S2L_BARRIER/go``
exists; with ``$S2L_PAUSE_AFTER=N`` the first N calls pass straight through. A test
thus knows that a process is inside that step (and, for worker processes,
their ids) before it starts a second process or sends a signal, without relying on timing.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

_ORIGINAL = None
_CALLS = 0


def _target():
    module, name = os.environ["S2L_PAUSE"].split(":")
    return importlib.import_module(module), name


def paused(*args, **kwargs):
    """Announce this process at the barrier, wait for ``go``, then do the real work."""
    global _CALLS
    _CALLS += 1
    module, name = _target()
    # In a worker started afresh (not forked) the module holds the original.
    original = _ORIGINAL or getattr(module, name)
    if _CALLS <= int(os.environ.get("S2L_PAUSE_AFTER", "0")):
        return original(*args, **kwargs)
    barrier = Path(os.environ["S2L_BARRIER"])
    (barrier / f"started-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody opened the barrier {barrier}")
        time.sleep(0.05)
    return original(*args, **kwargs)


def main() -> None:
    global _ORIGINAL
    module, name = _target()
    _ORIGINAL = getattr(module, name)
    setattr(module, name, paused)
    from s2l_core.cli import main as cli

    sys.exit(cli(sys.argv[1:]))
