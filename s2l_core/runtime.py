"""Run-time plumbing shared by every step: seeding, device choice, worker processes."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import InvalidStateError, ProcessPoolExecutor
from typing import TypeVar

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "cpu_bf16_native",
    "cpu_bf16_wanted",
    "parallel_map",
    "pick_device",
    "process_running",
    "restore_rng_state",
    "rng_state",
    "set_seed",
]

T = TypeVar("T")
R = TypeVar("R")


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and PyTorch's global random number generators.

    Parameters
    ----------
    seed : int
        The seed.
    deterministic : bool, optional
        Also ask PyTorch for deterministic algorithms (bit-identical results on the CPU
        for the same seed; slower on CUDA).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds code that uses the global state
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state(rng: np.random.Generator) -> dict:
    """The state of ``rng`` and of Python's, NumPy's and PyTorch's (CPU and CUDA) global
    generators, as plain values and tensors (``torch.load(weights_only=True)`` safe)."""
    import torch

    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["python"] = list(random.getstate()[1])
    return state


def restore_rng_state(rng: np.random.Generator, state: dict) -> None:
    """Put ``rng`` and the global generators back into a :func:`rng_state`."""
    import torch

    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))


def pick_device(preference: str = "auto", *, verbose: bool = True):
    """Choose the PyTorch device and say what was chosen.

    Parameters
    ----------
    preference : {"auto", "cuda", "cpu"} or str, optional
        ``"auto"`` takes CUDA when present, else the CPU; anything else is passed to
        :class:`torch.device` and must be available.
    verbose : bool, optional
        Print the choice (device name, and threads on the CPU).

    Returns
    -------
    torch.device

    Raises
    ------
    RuntimeError
        If CUDA is asked for but not available.
    """
    import torch

    if preference == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no CUDA device")
    if verbose:
        if device.type == "cuda":
            print(f"Using CUDA: {torch.cuda.get_device_name(device)}")
        else:
            print(f"Using the CPU ({torch.get_num_threads()} threads)")
    return device


#: CPU flags (Linux ``/proc/cpuinfo``) of instructions that compute bfloat16 natively.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so that
    bfloat16 autocast speeds a network up rather than slowing it down (emulated).

    Parameters
    ----------
    cpuinfo : str, optional
        Text in the format of Linux's ``/proc/cpuinfo``; default this machine's (empty,
        so ``False``, where there is none, as on macOS and Windows).

    Returns
    -------
    bool
    """
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags" and set(value.split()) & set(BF16_FLAGS):
            return True
    return False


def cpu_bf16_wanted(asked: bool, device, *, verbose: bool = True) -> bool:
    """Whether to autocast to bfloat16: ``asked``, on the CPU, and the CPU computes it
    natively (:func:`cpu_bf16_native`); with ``verbose``, say so where it was asked."""
    if not (asked and device.type == "cpu"):
        return False
    native = cpu_bf16_native()
    if verbose:
        print(
            "Training in bfloat16 on the CPU"
            if native
            else "cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so "
            "training stays in float32"
        )
    return native


def parallel_map(
    func: Callable[[T], R],
    items: Sequence[T],
    workers: int | None = None,
    desc: str = "",
    progress: bool = True,
) -> list[R]:
    """Map ``func`` over ``items`` in worker processes, in order, with a progress bar.

    Parameters
    ----------
    func : callable
        A picklable function of one argument.
    items : sequence
        The arguments.
    workers : int, optional
        Worker processes; default the number of CPUs (at most 8). 1 runs in this process.
    desc : str, optional
        Progress bar label.
    progress : bool, optional
        Show a progress bar.

    Returns
    -------
    list
        ``[func(item) for item in items]``.

    Notes
    -----
    Workers ignore Ctrl-C (the caller gets ``KeyboardInterrupt`` and the workers are
    stopped) and end themselves within a second of their parent being killed.
    """
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(items) <= 1:
        return [func(item) for item in tqdm(items, desc=desc, disable=not progress)]
    pool = ProcessPoolExecutor(
        max_workers=workers, initializer=_worker_start, initargs=(os.getpid(),)
    )
    try:
        chunks = max(1, len(items) // (workers * 8))
        mapped = pool.map(func, items, chunksize=chunks)
        result = list(tqdm(mapped, total=len(items), desc=desc, disable=not progress))
    except BaseException:
        # An error or Ctrl-C: stop the workers now rather than after the queued items.
        with _quiet_broken_pool():
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return result


@contextlib.contextmanager
def _quiet_broken_pool() -> Iterator[None]:
    """Silence one known race of Python's process pool while it is torn down on purpose:
    its management thread marks every pending future broken, and a future that was
    cancelled meanwhile (by the caller, or by ``pool.map``'s iterator as it is closed)
    makes it raise ``InvalidStateError``, printed as a traceback from a thread. The
    run's own error or Ctrl-C is what the caller reports; other thread errors pass."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not issubclass(args.exc_type, InvalidStateError):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _worker_start(parent: int) -> None:
    """Start of a :func:`parallel_map` worker: Ctrl-C is the parent's to handle, and the
    worker ends itself when the process that started it is gone (killed outright), instead
    of running on, orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started_by = os.getppid()

    def watch() -> None:
        while os.getppid() == started_by and process_running(parent):
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch, name="s2l-parent-watch", daemon=True).start()


def process_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (this one always does; another
    user's counts, as does one that cannot be asked)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's (or cannot tell)
        return True
    return True
