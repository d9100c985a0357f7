"""Where tasks run: worker processes on this machine, or the workers of a Ray cluster.

A *task* is a top-level (picklable) function called with one tuple of arguments, e.g. one slide of a
stage or one fold of a cross-validation. An executor runs many tasks and yields a :class:`TaskOutcome`
for each as it completes, so the calling process alone writes states, ledgers and reports, whichever
executor ran the work:

- :class:`LocalExecutor`: in this process (one worker), or a pool of spawned worker processes that die
  with the process that started them (a killed stage leaves no worker writing outputs). Tasks
  that need a GPU get one worker per visible GPU, each worker pinned to its GPU with
  ``CUDA_VISIBLE_DEVICES`` before any CUDA library loads, so folds (or extraction tasks) spread across
  the GPUs of one host.
- :class:`RayExecutor`: each task is a Ray task with its resources declared (CPUs; GPUs when the
  cluster has any), on the cluster at ``address`` or on a local cluster started with this machine's
  CPUs and GPUs. Ray gives each GPU task its own ``CUDA_VISIBLE_DEVICES``.

In both cases a task should use the device ``"cuda"`` (the first visible GPU), not a fixed index.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import ConfigError, WsiError

#: Where tasks run: this machine's processes, or a Ray cluster.
ExecutorName = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)


@dataclass(frozen=True)
class TaskResources:
    """What one task needs.

    Attributes:
        cpus: CPU cores per task (Ray schedules by it; local workers are processes of one core each).
        gpus: GPUs per task; 0 = CPU only. Where no GPU is visible (this machine for the local
            executor, the cluster for Ray) the task is run anyway, without one: it then picks its own
            device (e.g. falls back to the CPU or raises a clear error).
        devices: the GPUs (``CUDA_VISIBLE_DEVICES`` entries) the local executor spreads GPU tasks over;
            None = every visible GPU. Ray ignores it: it assigns its cluster's GPUs itself.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.cpus <= 0 or self.gpus < 0:
            raise ConfigError(f"Task resources need cpus > 0 and gpus ≥ 0, got cpus={self.cpus}, gpus={self.gpus}")

    @classmethod
    def for_device(cls, device: str, cpus: float = 1.0) -> TaskResources:
        """One GPU for a task on ``"cuda"``, ``"cuda:k"`` or ``"auto"``; none for ``"cpu"``."""
        return cls(cpus=cpus, gpus=0.0 if str(device).startswith("cpu") else 1.0)


@dataclass
class TaskOutcome:
    """The end of one task.

    Attributes:
        key: the key the task was submitted with.
        value: what the function returned (None when it did not return).
        error: the exception that ended the task (raised by the function, or the worker process or
            node died), or None.
        seconds: wall time of the task in its worker (queueing excluded).
    """

    key: Any
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str:
        """One line saying why the task did not finish ('' when it did)."""
        if self.error is None:
            return ""
        if isinstance(self.error, BrokenProcessPool):
            return f"the worker process died while running this task ({self.error})"
        return f"{type(self.error).__name__}: {self.error}"


def _timed_call(fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    """Run in the worker: call ``fn(*args)`` and time it there."""
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs).

    Read from ``CUDA_VISIBLE_DEVICES`` when it is set, else counted by torch (``[]`` without CUDA).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch without CUDA support, or a broken driver: no GPU to spread over
        return []


def _pin_gpu(slots: Any, threads: int) -> None:
    """Take one GPU from the shared queue and make it the only visible one, and give the worker its share
    of the CPU cores (unless the user set thread counts), as Ray does for its tasks."""
    os.environ["CUDA_VISIBLE_DEVICES"] = slots.get()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies
_PARENT_POLL_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """End this worker as soon as ``parent_pid`` (the process that runs the stage and holds its lock) dies.

    Without it a worker whose parent was killed would finish its task and write outputs that no lock
    protects and no state records. On Linux the kernel sends SIGKILL at the parent's death
    (``PR_SET_PDEATHSIG``); elsewhere, and for a parent that died before that call, a daemon thread
    watches the parent id every second.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(parent_pid: int, slots: Any = None, threads: int = 1) -> None:
    """Worker initialiser: die with the parent; pin a GPU when ``slots`` holds the pool's GPUs."""
    _die_with_parent(parent_pid)
    if slots is not None:
        _pin_gpu(slots, threads)


class LocalExecutor:
    """Tasks on this machine: in this process, or in spawned worker processes.

    Args:
        workers: worker processes for CPU tasks (1 = run in this process, one task after another).
        resources: per-task needs; with ``gpus > 0`` and more than one visible GPU, the pool has one
            worker per GPU (``workers`` is then ignored), each pinned to its GPU.
        gpus: the GPUs to spread GPU tasks over (default: :func:`visible_gpus`).
    """

    name = "local"

    def __init__(self, workers: int = 1, resources: TaskResources | None = None,
                 gpus: Sequence[str] | None = None):
        self.resources = resources or TaskResources()
        # Only GPU tasks look for GPUs: counting them imports torch, seconds a CPU stage need not spend.
        if gpus is None and self.resources.devices is not None:
            gpus = self.resources.devices
        self.gpus = list(gpus) if gpus is not None else (visible_gpus() if self.resources.gpus > 0 else [])
        self.workers = max(1, int(workers))
        self.pinned = self.resources.gpus > 0 and len(self.gpus) > 1
        if self.pinned:
            self.workers = len(self.gpus)

    def describe(self) -> str:
        if self.pinned:
            return f"local, one worker on each of GPUs {','.join(self.gpus)}"
        return f"local, {self.workers} worker{'s' if self.workers > 1 else ''}"

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple[Any, tuple]]) -> Iterator[TaskOutcome]:
        """Run ``fn(*args)`` for each ``(key, args)``; yield outcomes in order of completion."""
        tasks = list(tasks)
        if not tasks:
            return
        if self.workers <= 1 or (len(tasks) == 1 and not self.pinned):
            for key, args in tasks:
                t0 = time.perf_counter()
                try:
                    value, seconds = _timed_call(fn, args)
                    yield TaskOutcome(key, value, None, seconds)
                except Exception as exc:  # reported to the caller, who decides whether the batch goes on
                    yield TaskOutcome(key, None, exc, time.perf_counter() - t0)
            return
        ctx = mp.get_context("spawn")
        initargs: tuple = (os.getpid(),)
        if self.pinned:
            slots = ctx.Queue()
            for g in self.gpus:
                slots.put(g)
            initargs = (os.getpid(), slots, max(1, (os.cpu_count() or 1) // len(self.gpus)))
        n = min(self.workers, len(tasks))
        with cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                                    initargs=initargs) as pool:
            futures = {pool.submit(_timed_call, fn, args): key for key, args in tasks}
            for fut in cf.as_completed(futures):
                key = futures[fut]
                try:
                    value, seconds = fut.result()
                    yield TaskOutcome(key, value, None, seconds)
                except Exception as exc:  # raised by fn, or the worker process died (killed, segfault)
                    yield TaskOutcome(key, None, exc, 0.0)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise WsiError("The ray executor needs Ray: pip install 'wsi2dmamba[ray]' (on every node of the "
                       "cluster), or use --executor local.") from exc
    return ray


def connect_ray(address: str | None = None) -> Any:
    """Connect to the Ray cluster at ``address`` (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``), or
    start a local one with this machine's CPUs and GPUs; reuse a connection this process already has.
    Returns the ``ray`` module."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        _check_reachable(address)
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
        raise WsiError(f"Could not connect to {where}: {exc}. Check --ray-address (e.g. 'auto' on a node "
                       "of a cluster started with `ray start`), or leave it out to start a local cluster.") from exc
    return ray


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nobody answers at: Ray itself keeps retrying
    for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise WsiError(f"No Ray cluster answers at --ray-address {address} ({exc}). Check the head node's "
                       "address and port (`ray status` on the head node), or leave --ray-address out to "
                       "start a local cluster.") from None


class RayExecutor:
    """Each task a Ray task with its resources declared.

    Args:
        address: the cluster (see :func:`connect_ray`); None starts a local cluster.
        resources: per-task needs. A GPU request on a cluster without GPUs is dropped (the task then
            runs on a CPU worker and picks its own device) rather than waiting for ever.
        max_retries: times Ray reruns a task whose worker process or node died.
        max_in_flight: tasks submitted at once (default: four per cluster CPU), so that a cohort of
            tens of thousands of slides does not flood the scheduler.
    """

    name = "ray"

    def __init__(self, address: str | None = None, resources: TaskResources | None = None, *,
                 max_retries: int = 1, max_in_flight: int | None = None):
        self.ray = connect_ray(address)
        self.resources = resources or TaskResources()
        cluster = self.ray.cluster_resources()
        self.cluster_cpus = float(cluster.get("CPU", 1.0))
        self.cluster_gpus = float(cluster.get("GPU", 0.0))
        self.gpus = self.resources.gpus if self.cluster_gpus > 0 else 0.0
        if self.gpus > self.cluster_gpus:
            raise ConfigError(f"Each task asks for {self.gpus:g} GPUs but the Ray cluster has only "
                              f"{self.cluster_gpus:g}.")
        self.cpus = min(self.resources.cpus, self.cluster_cpus)
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight or max(4, int(4 * self.cluster_cpus))

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return (f"ray ({self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs in the cluster; "
                f"{self.cpus:g} CPU{gpu} per task)")

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple[Any, tuple]]) -> Iterator[TaskOutcome]:
        """Run ``fn(*args)`` for each ``(key, args)`` as Ray tasks; yield outcomes in order of completion."""
        ray = self.ray
        remote = ray.remote(_timed_call).options(num_cpus=self.cpus, num_gpus=self.gpus,
                                                 max_retries=self.max_retries)
        fn_ref = ray.put(fn)  # shipped once, not once per task
        pending = iter(list(tasks))
        running: dict[Any, Any] = {}

        def submit_more() -> None:
            while len(running) < self.max_in_flight:
                try:
                    key, args = next(pending)
                except StopIteration:
                    return
                running[remote.remote(fn_ref, args)] = key

        submit_more()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            key = running.pop(ref)
            try:
                value, seconds = ray.get(ref)
                outcome = TaskOutcome(key, value, None, seconds)
            except ray.exceptions.RayTaskError as exc:  # raised by fn itself: hand back its own exception
                cause = getattr(exc, "cause", None)
                outcome = TaskOutcome(key, None, cause if isinstance(cause, BaseException) else exc, 0.0)
            except ray.exceptions.RayError as exc:  # the worker or its node died, the task was cancelled
                outcome = TaskOutcome(key, None, exc, 0.0)
            submit_more()
            yield outcome


def make_executor(kind: str = "local", *, workers: int = 1, resources: TaskResources | None = None,
                  ray_address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor named ``kind`` (``"local"`` or ``"ray"``)."""
    if kind == "local":
        if ray_address:
            raise ConfigError("--ray-address is only used with --executor ray.")
        return LocalExecutor(workers=workers, resources=resources)
    if kind == "ray":
        return RayExecutor(address=ray_address, resources=resources)
    raise ConfigError(f"Unknown executor {kind!r}; use one of: {', '.join(EXECUTORS)}.")


def run_tasks(fn: Callable[..., Any], tasks: Iterable[tuple[Any, tuple]], *, executor: str = "local",
              workers: int = 1, resources: TaskResources | None = None,
              ray_address: str | None = None) -> Iterator[TaskOutcome]:
    """Run ``fn(*args)`` for each ``(key, args)`` on the named executor; yield outcomes as they complete.

    The one call for work that is not per slide, e.g. the folds of a cross-validation::

        for out in run_tasks(train_fold, [(k, (k, cfg, run)) for k in range(5)], executor="ray",
                             resources=TaskResources(cpus=2, gpus=1)):
            ...
    """
    yield from make_executor(executor, workers=workers, resources=resources, ray_address=ray_address).map(fn, tasks)
