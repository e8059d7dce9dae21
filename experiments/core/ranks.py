"""Starting the ranks of a run on this machine: processes forked from a server that imported torch
once (on CPU; CUDA ranks are spawned, see :func:`start_method`).

A rank started with ``spawn`` is a new interpreter that imports torch and Dynamo (torch's
optimizers import it) all over again: about 4.5 s of CPU per rank on a laptop, more where the
CUDA libraries load, at every point of a sweep and every probe of a ``max_seqlen`` search. With
the ``forkserver`` start method, one server process per launching process imports them once and
every rank is forked from it (a 4-probe search on CPU: 30 s -> 16 s). The server only imports:
it initialises no CUDA, makes no process group and starts no thread of ours, so a rank starts
as clean as a spawned one, except in two ways this module makes up for:

- The server keeps the environment it started with. Each rank takes the launcher's environment
  as it is at launch (a Hydra job's ``env_set``, a test's ``monkeypatch.setenv``) before anything
  else runs. Only the modules the server imported (``PRELOAD``: torch's own) read theirs at its start.
- A rank's parent is the server, which outlives the launcher while any rank still runs, so a
  parent-death signal does not fire when the launcher dies. A thread of each rank watches the
  launcher and kills the rank when it is gone, however it died.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

# What the server imports once: torch, its process groups, and Dynamo (every optimizer imports
# it). Nothing of this repository's: the server never runs a line of the ranks' code.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo"]


def start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS) and the launcher sees no CUDA
    device, else ``spawn``.

    CUDA ranks are spawned: torch marks a process whose CUDA driver was queried (even a
    ``torch.cuda.device_count()``) as unable to use CUDA in its forked children, so one such call
    at import in any preloaded module, in any torch version, would fail every rank at its first
    CUDA call. A GPU step takes seconds to minutes, so the import it saves there hardly counts."""
    import torch

    if torch.cuda.is_available() or "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "forkserver"


def start_ranks(fn: Callable, args: tuple, nprocs: int) -> mp.ProcessContext:
    """``torch.multiprocessing.start_processes(fn, args, nprocs, join=False)``: rank ``i`` runs
    ``fn(i, *args)`` in the launcher's current environment and dies with the launcher."""
    method = start_method()
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)  # used when the server starts (once)
    with _plain_default_start_method():
        return mp.start_processes(
            _rank_main, args=(fn, dict(os.environ), args), nprocs=nprocs, join=False, start_method=method
        )


@contextlib.contextmanager
def _plain_default_start_method():
    """A rank sets the start method its launcher had as the process default before anything else;
    where that is a launcher's own (Hydra's joblib launcher runs jobs in loky workers, whose
    default is ``loky``), no fresh interpreter knows it and every rank dies at start. Ranks are
    started with ``spawn`` as the default meanwhile."""
    old = multiprocessing.get_start_method(allow_none=True)
    if old in (None, "spawn", "fork", "forkserver"):
        yield
        return
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            multiprocessing.set_start_method(old, force=True)


def _rank_main(local_rank: int, fn: Callable, environ: dict, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environ)
    _die_with_launcher()
    fn(local_rank, *args)


def _die_with_launcher() -> None:
    """SIGKILL this rank when the process that launched it dies, however it dies.

    torch.multiprocessing asks the parent-death signal for SIGINT, which a rank does not act on
    while it waits in a collective, nor at all where SIGINT is ignored (a launcher started with
    ``&`` from a script): such ranks outlived a killed launcher, holding their memory. Where the
    launcher is the parent (``spawn``), the kernel's SIGKILL comes at once; in every case a thread
    waits on the launcher's end of the pipe the rank was started through, which closes when the
    launcher exits (already closed: it died first, and the thread kills the rank at once)."""
    launcher = multiprocessing.parent_process()
    if launcher is None:
        return
    if sys.platform.startswith("linux") and os.getppid() == launcher.pid:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        multiprocessing.connection.wait([launcher.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def run_ranks(fn: Callable, args: tuple, nprocs: int) -> None:
    """:func:`start_ranks`, then wait for every rank; a rank's failure raises as in
    ``torch.multiprocessing.spawn`` (the others are stopped)."""
    ranks = start_ranks(fn, args, nprocs)
    while not ranks.join():
        pass


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux ``/proc``; elsewhere none)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, theirs, and so on (Linux ``/proc``; elsewhere none)."""
    found, todo = [], [pid]
    while todo:
        new = children(todo.pop())
        found += new
        todo += new
    return found


def rank_pids(launcher: int) -> list[int]:
    """The live ranks :func:`start_ranks` started in process ``launcher``, in rank order (they are
    started one after another): spawned ones are its children, forked ones its fork server's; not
    multiprocessing's resource tracker (Linux ``/proc``)."""
    ranks = []
    for child in children(launcher):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            ranks.append(child)
        elif b"multiprocessing.forkserver" in cmdline:
            ranks += children(child)
    return sorted(ranks)
