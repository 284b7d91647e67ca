"""Process-wide settings that the CLI applies before it builds anything, and the end of a distributed run."""

import contextlib
import ctypes
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30
_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(nbytes: int = KEEP_BYTES) -> bool:
    """Let glibc's ``malloc`` reuse freed tensor memory instead of giving it back to the OS at every step.

    glibc serves each allocation above its mmap threshold (128 KiB at start, then adapting to what the
    process has freed, up to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and it trims the heap
    top as it shrinks. A training step's activations are such allocations, so steps page-fault them in
    again; how often depends on what the process did before. On this project's 2-core machine a 3-epoch
    LeNet-5 fit of ``configs/mnist_lenet_fast.yaml`` took 50,000-150,000 page faults in a fresh process,
    and over a million in one that had trained before; with both thresholds at ``nbytes`` it took 14,000.
    The resident memory then stays near its peak instead of shrinking between steps.

    Does nothing off Linux/glibc, or when ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set
    (glibc's own variables: the user's choice wins). Returns whether the thresholds were set.
    """
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _ENV_VARS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))


class _SignalStack(ctypes.Structure):  # stack_t of sigaltstack(2), Linux
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Give the calling thread back its alternate signal stack after the block (around OpenVINO calls).

    OpenVINO's CPU plugin installs an alternate signal stack of its own on the thread that first compiles a
    model with a new ``openvino.Core`` and, when that core goes, reinstalls the stack it found. Cores that go
    in another order than they came (NNCF's own, one per loaded model) leave the thread on a stack already
    freed: the next signal handled on it (a DataLoader worker's SIGCHLD, Python's handlers run on the alternate
    stack) kills the process with SIGSEGV, far from any OpenVINO call. With the thread's own stack put back at
    once, every core saves and restores that one, in any order. Does nothing off Linux.
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            saved = _SignalStack()
            if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
                libc = None
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.sigaltstack(ctypes.byref(saved), None)


def skip_nvml_probe_without_gpu() -> bool:
    """Stop torch from looking for NVIDIA's driver library at every optimizer step when there is no GPU.

    Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so that asking whether CUDA is available
    does not initialise it and fork-based DDP stays possible). With that set, ``torch.cuda.is_available()``
    tries to load ``libnvidia-ml.so.1`` on every call until CUDA is initialised, and torch's optimizers ask
    once per ``step()``: 0.12 ms a call on this project's 2-core CPU machine, against 1.5 us without.
    Where no CUDA device is visible at all there is nothing to keep uninitialised, so the variable is turned
    off and torch asks the CUDA runtime, which answers from its cache. Does nothing when a GPU is visible or
    the variable is not set. Returns whether it was turned off.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return False
    import torch

    if torch.cuda.device_count() > 0:
        return False
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    return True


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def log_info_to_stdout() -> None:
    """Lightning's progress and info lines go to stdout, so stderr carries only warnings and errors."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                logger.removeHandler(handler)
                out = logging.StreamHandler(sys.stdout)
                out.addFilter(_NoAdverts())
                logger.addHandler(out)


def finish_distributed(children: Sequence[subprocess.Popen] = (), timeout_s: float = 600) -> int:
    """End this process's part in a distributed run while the interpreter is still whole, then wait for the
    ranks it launched. Returns the first non-zero exit status among them (0 when all succeeded).

    Why: a collective's tensors are freed by the backend's worker thread that ran it, slightly after the
    caller has its result. A tensor Python has seen needs the GIL to be freed; a thread that asks for the GIL
    once the interpreter is finalizing is ended with ``pthread_exit``, whose unwinding through gloo's
    ``noexcept`` worker loop calls ``std::terminate``: "terminate called without an active exception" and
    exit 134 after a run that finished (seen in a core dump: ``ProcessGroupGloo::runLoop`` ->
    ``~AsyncBroadcastWork`` -> ``decref`` -> ``take_gil`` -> ``pthread_exit``, the main thread in
    ``Py_FinalizeEx``). Lightning's atexit ``destroy_process_group`` does not prevent it: DDP's reducer keeps
    the group, and its worker threads, alive until the process ends. So every rank ends with a barrier:
    gloo's barrier takes the lock under which workers free finished work and waits for everything queued
    before it, and it carries no Python tensor of its own, so nothing is left for a worker to free. Then the
    group is destroyed (Lightning's atexit handler becomes a no-op).

    The launching process (Lightning starts ranks 1..N-1 as child processes) then waits for its children, so
    a rank that fails after rank 0 is done is not lost: its status becomes the command's.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
        dist.destroy_process_group()
    status = 0
    for rank, child in enumerate(children, start=1):
        try:
            code = child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        if code and not status:
            print(f"error: rank {rank} (pid {child.pid}) exited with status {code} after this rank finished", file=sys.stderr)
            status = code if code > 0 else 128 - code
    return status
