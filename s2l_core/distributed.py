"""Several processes, one run: torchrun and SLURM launches, the process group, and
collective helpers that do nothing when a process runs alone.

``torchrun --nproc_per_node=N s2l train ...`` (or ``srun`` with ``MASTER_ADDR`` and
``MASTER_PORT`` exported) starts N copies of one command. :func:`setup` reads from the
environment where this copy stands (:func:`detect`) and joins the others in one process
group: NCCL where the processes train on CUDA GPUs, gloo on the CPU. The training loop
(:class:`s2l_core.train.Trainer`) and :func:`s2l_core.predict.predict_folder` then share
their work through the helpers of this module.

The contract
------------
- **One process is unchanged.** Without a launcher (or with a launcher of one process)
  nothing here communicates: :func:`rank` is 0, :func:`world_size` 1,
  :func:`all_gather_object` returns ``[obj]``, :func:`broadcast_object` returns ``obj``,
  :func:`on_main` and :func:`on_every_rank` call their function and let its errors
  through as they are, and :func:`wrap_model` returns the model itself. Code written
  with these helpers runs exactly as code written without them.
- **No process waits forever.** Every collective waits at most :func:`timeout_seconds`
  (``$S2L_DIST_TIMEOUT`` seconds, default 300); a process that loses the others (one of
  them failed and exited, or did not get there in time) raises
  :class:`CollectiveError`, which says so, instead of hanging.
- **One failure fails all.** :func:`on_main` and :func:`on_every_rank` are the points
  where the processes agree: when the function fails on one process, every process
  raises, the failing one its own error and the others :class:`RankFailed`, which names
  the process and repeats its message.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from s2l_core.runtime import pick_device

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "CollectiveError",
    "DistributedError",
    "Launch",
    "RankFailed",
    "all_gather_object",
    "backend_for",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "detect",
    "is_distributed",
    "is_main",
    "local_device",
    "local_rank",
    "on_every_rank",
    "on_main",
    "process_label",
    "rank",
    "rounds",
    "setup",
    "share",
    "teardown",
    "timeout_seconds",
    "world_size",
    "wrap_model",
]

T = TypeVar("T")

#: Environment variable: seconds a collective waits for the other processes.
TIMEOUT_ENV = "S2L_DIST_TIMEOUT"
#: Default of :data:`TIMEOUT_ENV`: five minutes, far more than any wait between two
#: collectives of a training or prediction (one image, one checkpoint written).
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A multi-process run stopped because of another process, or lost the others.

    Attributes
    ----------
    exit_status : int
        The exit status ``s2l`` gives it: 1, the system failed the run (as for a full
        disk), unless a subclass says otherwise.
    """

    exit_status = 1


class RankFailed(DistributedError):
    """Another process of this run failed; the message names it and repeats its error.

    Its exit status is 2 (a bad input or option), as that process's own error usually
    is; the failing process reports its own error with its own status.
    """

    exit_status = 2


class CollectiveError(DistributedError):
    """This process lost the others during a collective: one of them exited (failed, or
    was killed) or did not get there within :func:`timeout_seconds`."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-process launch.

    Attributes
    ----------
    rank : int
        This process's index among all processes, from 0 (0 is the main process).
    world_size : int
        Number of processes in all.
    local_rank : int
        This process's index among the processes on its own machine (its GPU there).
    launcher : {"torchrun", "slurm"}
        Which environment variables said so: torchrun's ``RANK``, ``WORLD_SIZE`` and
        ``LOCAL_RANK``, or SLURM's ``SLURM_PROCID``, ``SLURM_NTASKS`` and
        ``SLURM_LOCALID``.
    """

    rank: int
    world_size: int
    local_rank: int
    launcher: str


_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def _whole(env: Mapping[str, str], name: str, launcher: str) -> int:
    text = env.get(name)
    if text is None:
        raise ValueError(
            f"{name} is not set, but {launcher} variables are: a launch of several processes "
            f"needs {name} too (torchrun and srun set it); unset the others to run one process"
        )
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value}")
    return value


def detect(environ: Mapping[str, str] | None = None) -> Launch | None:
    """Where this process stands in a multi-process launch, from its environment.

    torchrun (and ``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``srun`` sets
    ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``; they count as a launch only
    where ``MASTER_ADDR`` and ``MASTER_PORT`` are set too (exported by the batch script),
    so that a single ``s2l`` command inside a SLURM job runs alone as before.

    Parameters
    ----------
    environ : Mapping of str to str, optional
        The environment to read; default ``os.environ``.

    Returns
    -------
    Launch or None
        ``None`` where no launcher started this process (it runs alone).

    Raises
    ------
    ValueError
        If the variables are incomplete or inconsistent (a rank outside the world, a
        missing ``MASTER_ADDR`` for several processes); the message names the variable.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        names, launcher = _TORCHRUN, "torchrun"
    elif "SLURM_PROCID" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        names, launcher = _SLURM, "slurm"
    else:
        return None
    rank_, world, local = (_whole(env, name, launcher) for name in names)
    if world < 1:
        raise ValueError(f"{names[1]} must be at least 1, got {world}")
    if rank_ >= world:
        raise ValueError(
            f"{names[0]}={rank_} is not below {names[1]}={world}: ranks count from 0 to {world - 1}"
        )
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} not set: {world} processes ({names[1]}) need the "
                "address and port of the main process to meet there (torchrun sets them; "
                "with srun, export them in the batch script)"
            )
    return Launch(rank_, world, local, launcher)


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How long a collective waits for the other processes: ``$S2L_DIST_TIMEOUT``
    seconds, default :data:`DEFAULT_TIMEOUT_S`.

    Raises
    ------
    ValueError
        If the variable is not a positive finite number.
    """
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_ENV)
    if text is None or text == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def backend_for(device: str | torch.device) -> str:
    """The process group's backend for a device preference: ``"nccl"`` for CUDA
    (``"auto"`` where CUDA is present), ``"gloo"`` otherwise."""
    if str(device) == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class _State:
    launch: Launch
    timeout_s: float
    owned: bool  # this module initialised the process group (and destroys it)


_STATE: _State | None = None


def _cuda_device(local: int) -> torch.device:
    """The GPU of the process with local rank ``local``."""
    count = torch.cuda.device_count()
    if local < count:
        return torch.device("cuda", local)
    if count == 1:  # srun --gpus-per-task=1 and the like: each process sees its own one
        return torch.device("cuda", 0)
    raise RuntimeError(
        f"this process is number {local} on its machine (LOCAL_RANK) but sees only {count} "
        "CUDA device(s): start at most one process per GPU (--nproc_per_node), or train "
        "on the CPU (--device cpu)"
    )


def setup(device: str | torch.device = "auto") -> bool:
    """Join the other processes of a launch in one process group, if there are any.

    Reads the environment (:func:`detect`); with a launch of two or more processes it
    initialises PyTorch's default process group (``init_method="env://"``) with the
    backend of :func:`backend_for` and a timeout of :func:`timeout_seconds` on every
    collective, and on CUDA makes ``cuda:LOCAL_RANK`` this process's device. Without a
    launch, or with one process, it does nothing. Call it once at the start of a script
    run under torchrun, before a :class:`s2l_core.train.Trainer` is made, with the same
    ``device`` that the trainer is given.

    Parameters
    ----------
    device : str or torch.device, optional
        ``"auto"``, ``"cpu"`` or ``"cuda"``: chooses NCCL (CUDA) or gloo (the CPU).

    Returns
    -------
    bool
        Whether this process now works with others (:func:`is_distributed`).

    Raises
    ------
    ValueError
        If the launch variables are inconsistent (:func:`detect`, :func:`timeout_seconds`).
    RuntimeError
        If this PyTorch has no ``torch.distributed``, a process has no GPU of its own,
        or the processes cannot meet (:class:`CollectiveError`, naming the address).
    """
    global _STATE
    launch = detect()
    if launch is None:
        _warn_lonely_slurm_task()
        return False
    if launch.world_size == 1:
        return False
    seconds = timeout_seconds()
    if not dist.is_available():
        raise RuntimeError(
            "this PyTorch build has no torch.distributed, so the processes started by "
            f"{launch.launcher} cannot work together; run one process, or install a build "
            "with distributed support"
        )
    if dist.is_initialized():  # the caller's own process group: use it as it is
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise RuntimeError(
                f"a process group of rank {dist.get_rank()} among {dist.get_world_size()} "
                f"exists, but the environment says rank {launch.rank} among "
                f"{launch.world_size}"
            )
        _STATE = _State(launch, seconds, owned=False)
        return True
    backend = backend_for(device)
    options: dict[str, Any] = {}
    if backend == "nccl":
        gpu = _cuda_device(launch.local_rank)
        torch.cuda.set_device(gpu)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = gpu  # binds the process group to it (PyTorch >= 2.3)
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=seconds),
            **options,
        )
    except (RuntimeError, ValueError) as err:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise CollectiveError(
            f"process {launch.rank} of {launch.world_size} could not join the others at "
            f"{where} ({_first_line(err)}): check that every process was given the same "
            "MASTER_ADDR and MASTER_PORT, that the port is free on the main machine and "
            f"reachable from the others, and that all {launch.world_size} processes were "
            f"started (they wait {seconds:g} s for each other, ${TIMEOUT_ENV})"
        ) from err
    _STATE = _State(launch, seconds, owned=True)
    return True


def _warn_lonely_slurm_task() -> None:
    """Say so where srun started several copies of a command that cannot meet."""
    env = os.environ
    try:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return
    if tasks > 1 and "SLURM_PROCID" in env and env.get("SLURM_PROCID") == "0":
        print(
            f"s2l: srun started {tasks} copies of this command, but MASTER_ADDR and "
            "MASTER_PORT are not set, so each runs alone and they write the same files; "
            "export both in the batch script to train together (see the book's appendix "
            "on several GPUs), or start one task",
            file=sys.stderr,
        )


def teardown() -> None:
    """Leave the process group that :func:`setup` made (nothing otherwise)."""
    global _STATE
    state, _STATE = _STATE, None
    if state is not None and state.owned and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process works with others (a process group of two or more)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's index among all, from 0; 0 when it runs alone."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes working together; 1 when this one runs alone."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index among those on its machine; 0 when it runs alone."""
    if not is_distributed():
        return 0
    if _STATE is not None:
        return _STATE.launch.local_rank
    launch = detect()
    return launch.local_rank if launch is not None else 0


def is_main() -> bool:
    """Whether this is the main process (rank 0), the one that writes and reports."""
    return rank() == 0


def process_label() -> str:
    """``" (process R of N)"`` for messages, or ``""`` when this process runs alone."""
    return f" (process {rank()} of {world_size()})" if is_distributed() else ""


def share(n: int) -> range:
    """The indices of ``n`` items that this process handles: ``rank, rank + N, ...``
    (every index once over all processes; ``range(n)`` alone)."""
    return range(rank(), n, world_size())


def rounds(n: int, per_process: int = 1) -> list[list[int]]:
    """:func:`share` of ``n`` items cut into rounds of at most ``per_process`` items.

    Round ``k`` holds this process's indices among items ``k * N * per_process`` to
    ``(k + 1) * N * per_process - 1``. Every process gets the same number of rounds (its
    last ones may be empty), so the processes can exchange results, or agree that all
    went well, after each round: no process then waits longer than a round's work for
    the others, and a failure stops every process within a round.

    Parameters
    ----------
    n : int
        Number of items.
    per_process : int, optional
        Items per process and round.

    Returns
    -------
    list of list of int
        Alone: ``[[0, ..., p - 1], [p, ..., 2p - 1], ...]``, every index in order.
    """
    if per_process < 1:
        raise ValueError(f"per_process must be at least 1, got {per_process}")
    world, me = world_size(), rank()
    step = world * per_process
    return [list(range(start + me, min(start + step, n), world)) for start in range(0, n, step)]


def _timeout_text() -> str:
    seconds = _STATE.timeout_s if _STATE is not None else DEFAULT_TIMEOUT_S
    return f"{seconds:g} s, ${TIMEOUT_ENV}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the error of a collective that lost the other processes into a
    :class:`CollectiveError` that says what happened and where."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # DistBackendError, a timeout, a connection closed
        raise CollectiveError(
            f"process {rank()} of {world_size()} lost the other processes while {what} "
            f"({_first_line(err)}): another process most likely failed first (its error "
            "is printed above) or did not get there in time "
            f"({_timeout_text()}); the whole run stops"
        ) from err


def barrier(what: str = "waiting for the other processes") -> None:
    """Wait until every process gets here (nothing when this one runs alone)."""
    if is_distributed():
        with _collective(what):
            dist.barrier()


def all_gather_object(obj: T, what: str = "exchanging results") -> list[T]:
    """Every process's ``obj`` (picklable), in rank order, on every process.

    Parameters
    ----------
    obj : object
        This process's contribution, e.g. a NumPy array or a dict of floats.
    what : str, optional
        What is being done, for the error message if the others are lost.

    Returns
    -------
    list
        ``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` when this process runs alone.

    Raises
    ------
    CollectiveError
        If the other processes are lost (see :func:`timeout_seconds`).
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    with _collective(what):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, what: str = "receiving a result", src: int = 0) -> T:
    """Process ``src``'s ``obj`` (picklable) on every process; ``obj`` itself when this
    process runs alone. The other processes' ``obj`` is ignored.

    Raises
    ------
    CollectiveError
        If the other processes are lost.
    """
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    with _collective(what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(
    module: torch.nn.Module, what: str = "sharing the batch norm statistics"
) -> None:
    """Copy the main process's buffers of ``module`` (batch norm running statistics)
    to every process, so that all hold the same network (nothing alone)."""
    if not is_distributed():
        return
    with _collective(what):
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def local_device(preference: str | torch.device = "auto", *, verbose: bool = False) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for ``"auto"`` (where CUDA is present)
    and ``"cuda"``, the CPU for ``"cpu"``; a device with an index is kept as given.
    Alone, :func:`s2l_core.runtime.pick_device`'s choice.

    Raises
    ------
    RuntimeError
        If CUDA is asked for but absent, or this process has no GPU of its own.
    """
    if not is_distributed():
        return pick_device(preference, verbose=verbose)
    if isinstance(preference, torch.device):
        device = preference
    elif preference == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no CUDA device")
        if device.index is None:
            device = _cuda_device(local_rank())
    if verbose:
        if device.type == "cuda":
            where = f"its own GPU ({torch.cuda.get_device_name(device)})"
        else:
            threads = torch.get_num_threads()
            where = f"the CPU ({threads} thread{'s' if threads != 1 else ''} each)"
        print(f"{world_size()} processes work together, each on {where}")
    return device


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in :class:`torch.nn.parallel.DistributedDataParallel`, which averages
    the gradients of every step over the processes; ``model`` itself alone.

    The wrapper shares the model's parameters (an optimiser of ``model`` steps it) and
    starts every process from the main process's weights and buffers.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    with _collective("wrapping the network for training in several processes"):
        return DistributedDataParallel(model, device_ids=ids)


def _describe(err: BaseException) -> str:
    """One line of an error for the other processes: its message (with its type where
    the message alone would not say what went wrong)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (ValueError, OSError, RuntimeError)):
        return text
    return f"{type(err).__name__}: {text}"


def _raise_failed(statuses: dict[int, str | None], what: str) -> None:
    """Raise :class:`RankFailed` for the first process whose status is an error."""
    failed = [(r, s) for r, s in sorted(statuses.items()) if s is not None]
    if failed:
        first, message = failed[0]
        more = f" (and {len(failed) - 1} other process(es))" if len(failed) > 1 else ""
        raise RankFailed(f"process {first} of {world_size()}{more} failed while {what}: {message}")


def on_main(func: Callable[[], T], what: str) -> T:
    """Run ``func`` on the main process only and give its result to every process.

    The processes wait for the main one here (a barrier): use it for what one process
    must do alone, such as writing a file that all then read.

    Parameters
    ----------
    func : callable
        Takes no argument; its result must be picklable.
    what : str
        What it does (``"writing the checkpoint"``), for the error messages.

    Returns
    -------
    object
        ``func()``'s result, on every process.

    Raises
    ------
    Exception
        On the main process, ``func``'s own error; on the others, :class:`RankFailed`
        repeating it. Alone: ``func``'s error as it is.
    """
    if not is_distributed():
        return func()
    result: Any = None
    error: Exception | None = None
    if is_main():
        try:
            result = func()
        except Exception as err:
            error = err
    payload = (None, result) if error is None else (_describe(error), None)
    status, value = broadcast_object(payload, what)
    if error is not None:
        raise error
    _raise_failed({0: status}, what)
    return value


def on_every_rank(func: Callable[[], T], what: str) -> T:
    """Run ``func`` on every process and fail every process if it fails on one.

    Parameters
    ----------
    func : callable
        Takes no argument: this process's share of some work.
    what : str
        What it does (``"predicting its share of the images"``), for the messages.

    Returns
    -------
    object
        This process's own ``func()`` result (results are not exchanged).

    Raises
    ------
    Exception
        On a process where ``func`` failed, its own error; on the others,
        :class:`RankFailed` naming the first process that failed and repeating its
        error. Alone: ``func``'s error as it is.
    """
    if not is_distributed():
        return func()
    result: Any = None
    error: Exception | None = None
    try:
        result = func()
    except Exception as err:
        error = err
    statuses = all_gather_object(None if error is None else _describe(error), what)
    if error is not None:
        raise error
    _raise_failed(dict(enumerate(statuses)), what)
    return result
