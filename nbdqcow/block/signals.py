"""The signals that stop a server, and keeping them away from helper threads.

Every thread the process starts besides the event loop's (worker pools, the writer,
write-behind, run_in_executor, the kernel-attach thread) calls
:func:`block_stop_signals` first."""

from __future__ import annotations

import signal

#: the signals that stop the server: only the event loop's thread takes them
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def block_stop_signals() -> None:
    """Keep SIGTERM/SIGINT away from the calling (helper) thread: the kernel then hands
    them to the event loop's thread, which can hold them off while the server ends
    (with the default action, one delivered to any thread kills the process)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
