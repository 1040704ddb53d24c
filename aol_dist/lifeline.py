"""A process that ends when another one does: a rank whose launcher is gone, a study's run whose study is gone.

``PR_SET_PDEATHSIG`` only sees the death of the parent (thread) that forked a process. A rank's launcher can
start it in a session of its own, and a study's runs are forked by a fork server that outlives the study, so
both watch the process they belong to instead: a daemon thread polls it and SIGTERMs this process once it
is gone (killed by SIGKILL too). A run ended this way stays ``<run>.incomplete`` with its checkpoints;
``train.resume=latest`` (or the next ``aol study``) continues it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

POLL_S = 1.0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def end_with(pid: int, every: float = POLL_S) -> threading.Thread:
    """SIGTERM this process once process ``pid`` has ended; returns the watching (daemon) thread."""
    return _watch(lambda: alive(pid), f"lifeline-{pid}", every)


def end_with_parent(every: float = POLL_S) -> threading.Thread:
    """SIGTERM this process once its parent has ended: it has been handed to another parent (init or a
    subreaper), which, unlike a pid, cannot be reused."""
    parent = os.getppid()
    return _watch(lambda: os.getppid() == parent, f"lifeline-parent-{parent}", every)


def _watch(running, name: str, every: float) -> threading.Thread:
    def watch() -> None:
        while running():
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread


def launched() -> bool:
    """Started by a launcher (``accelerate launch``, ``torchrun``): it sets the local rank. A run started from a
    shell (also under ``nohup``) is not tied to its parent."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
