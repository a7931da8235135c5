"""Parsers run in worker processes under time and memory limits, so that no parser bug, bomb or
slow file can take the calling process down, grow its memory, or keep the write lock.

A worker is a child Python that imports the parsers once, then serves calls one at a time over
its stdin and stdout (length-prefixed pickle frames). Workers are reused across files and ingest
runs. One that runs past its time is killed; one that runs out of memory or dies is replaced;
either way the next call starts a fresh one. An idle worker exits by itself after a while.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from ingest.document import LoadedDoc
from ingest.errors import LoadError, ParseTimeout
from ingest.limits import MB, ParseLimits

T = TypeVar("T")

START_TIMEOUT = 120.0  # seconds for a fresh worker to import its parsers (a loaded machine is slow)
IDLE_EXIT_S = 300.0  # an idle worker exits after this long, giving its memory back
_RETIRE_S = IDLE_EXIT_S - 30  # the parent stops using a worker well before it may exit on its own
_HEADER = struct.Struct("!Q")  # frame length, bytes
# Parsers need no thread pools; one thread also keeps the address space (RLIMIT_AS) small.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
_ROOT = str(Path(__file__).resolve().parents[1])  # so the worker imports this very checkout


class _Expired(Exception):
    """The time allowed ran out before the worker answered."""


class _Died(Exception):
    """The worker's end of the pipe closed: it exited or was killed."""


# --- the parent's side ---------------------------------------------------------------------------


class Runner:
    """Runs picklable calls (e.g. `functools.partial(load_file, path, ...)`) in up to `size`
    worker processes that first import `preload`. Safe to use from several threads."""

    def __init__(self, preload: tuple[str, ...] = (), *, size: int = 2) -> None:
        self._preload = preload
        self._free: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(size)

    def warm(self) -> None:
        """Start a worker now unless one is free, so its imports overlap the caller's other work."""
        with self._lock:
            if not any(w.usable() for w in self._free):
                self._free.append(_Worker(self._preload))

    def run(self, call: Callable[[], T], *, limits: ParseLimits, deadline: float | None = None) -> T:
        """`call()` in a worker, within `limits.parse_timeout` seconds of parsing (and before
        `deadline`, a time.monotonic() value, when given) and `limits.parse_memory_mb` of address
        space. Returns its result or raises its exception; LoadError when a limit stopped it or
        the worker died (ParseTimeout for time)."""
        if not self._slots.acquire(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise ParseTimeout("no parser was free before the time ran out")
        try:
            worker = self._take()
            try:
                reply = worker.call(call, limits, deadline)
            except BaseException:
                if worker.started:  # a request in flight: its outcome is unknown, never reuse it
                    worker.kill()
                else:  # still importing its parsers; the next call can use it
                    self._give(worker)
                raise
            kind, value = reply
            if kind == "memory":
                worker.kill()  # after a MemoryError the heap may be in any state: start clean
                raise LoadError(f"parser ran out of memory (limit {limits.parse_memory_mb} MB; MOERAG_PARSE_MEMORY_MB)")
            self._give(worker)
            if kind == "raise":
                raise value
            return value
        finally:
            self._slots.release()

    def _take(self) -> _Worker:
        with self._lock:
            while self._free:
                worker = self._free.pop()
                if worker.usable():
                    return worker
                worker.kill()
        return _Worker(self._preload)

    def _give(self, worker: _Worker) -> None:
        worker.started = False
        with self._lock:
            self._free.append(worker)


class _Worker:
    def __init__(self, preload: tuple[str, ...]) -> None:
        path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **_ONE_THREAD, "PYTHONPATH": path}
        # -c, not -m: the package imports this module first, and runpy warns about that.
        cmd = [sys.executable, "-c", "from ingest.isolate import serve; serve()", *preload]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self.ready = False
        self.started = False  # a request was sent and not yet answered
        self.last_used = time.monotonic()

    def usable(self) -> bool:
        return self.proc.poll() is None and time.monotonic() - self.last_used < _RETIRE_S

    def call(self, call: Callable, limits: ParseLimits, deadline: float | None) -> tuple[str, object]:
        if not self.ready:
            end = time.monotonic() + START_TIMEOUT
            try:
                self._receive(end if deadline is None else min(end, deadline))
            except _Expired:
                if deadline is not None and deadline < end:
                    raise ParseTimeout("the time ran out while the parser process was starting") from None
                self.kill()
                raise LoadError(f"the parser process did not start within {START_TIMEOUT:g} s") from None
            except _Died:
                raise LoadError(f"the parser process could not start ({self.kill_reason()})") from None
            self.ready = True
        start = time.monotonic()
        end = start + limits.parse_timeout
        by_deadline = deadline is not None and deadline < end
        request = pickle.dumps((call, limits.parse_memory_mb, limits.parse_timeout), protocol=pickle.HIGHEST_PROTOCOL)
        self.started = True
        try:
            self.proc.stdin.write(_HEADER.pack(len(request)) + request)
            reply = self._receive(deadline if by_deadline else end)
        except _Expired:
            self.kill()
            if by_deadline:
                raise ParseTimeout(f"parsing was stopped after {time.monotonic() - start:.1f} s: its time ran out") from None
            raise ParseTimeout(f"parsing took longer than {limits.parse_timeout:g} s (MOERAG_PARSE_TIMEOUT)") from None
        except (_Died, OSError):
            reason = self.kill_reason()
            if reason == "signal SIGXCPU":  # the worker's own CPU limit, the backstop for the timeout
                raise ParseTimeout(f"parsing took longer than {limits.parse_timeout:g} s (MOERAG_PARSE_TIMEOUT)") from None
            raise LoadError(f"the parser crashed ({reason})") from None
        self.started = False
        self.last_used = time.monotonic()
        return reply

    def _receive(self, end: float):
        (n,) = _HEADER.unpack(self._read(_HEADER.size, end))
        data = self._read(n, end)
        try:
            return pickle.loads(data)
        except Exception as exc:  # e.g. an exception class that does not unpickle
            self.kill()
            raise LoadError(f"the parser's answer could not be read: {exc.__class__.__name__}") from exc

    def _read(self, n: int, end: float) -> bytes:
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: a server's descriptors can pass FD_SETSIZE
        poller.register(fd, select.POLLIN)
        buf = bytearray()
        while len(buf) < n:
            left = end - time.monotonic()
            if left <= 0 or not poller.poll(math.ceil(left * 1000)):
                raise _Expired
            piece = os.read(fd, min(n - len(buf), 1 << 20))
            if not piece:
                raise _Died
            buf += piece
        return bytes(buf)

    def kill_reason(self) -> str:
        """Kill the worker (if it still runs) and say how it ended."""
        code = self.kill()
        if code is not None and code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit status {code}"

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (in the kernel); leave it to init
            code = None
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return code


_RUNNERS: dict[tuple[str, ...], Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def runner(*preload: str) -> Runner:
    """The process-wide runner whose workers import `preload` (module names) before serving."""
    with _RUNNERS_LOCK:
        if preload not in _RUNNERS:
            _RUNNERS[preload] = Runner(preload)
        return _RUNNERS[preload]


def file_parsers() -> Runner:
    """The runner whose workers parse files (ingest.loaders)."""
    return runner("ingest.loaders")


def parse_file(path: Path, *, max_bytes: int, limits: ParseLimits) -> LoadedDoc:
    """ingest.loaders.load_file in a worker process, under `limits`; LoadError with the reason."""
    from ingest.loaders import load_file

    return file_parsers().run(partial(load_file, path, max_bytes=max_bytes, limits=limits), limits=limits)


# --- the worker's side ---------------------------------------------------------------------------


def serve() -> None:
    """The worker's loop: import sys.argv[1:], then answer calls until stdin closes or idles out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us if it must
    out = os.dup(1)
    os.dup2(2, 1)  # a parser that prints must not corrupt the frames: fd 1 is stderr from here on
    for name in sys.argv[1:]:
        importlib.import_module(name)
    _write(out, ("ready", None))
    poller = select.poll()
    poller.register(0, select.POLLIN)
    while poller.poll(int(IDLE_EXIT_S * 1000)):
        header = _read_exactly(0, _HEADER.size)
        if header is None:
            return  # the parent closed our stdin (it exited, or killed us a moment from now)
        (n,) = _HEADER.unpack(header)
        data = _read_exactly(0, n)
        if data is None:
            return
        _write(out, _answer(data))


def _answer(data: bytes) -> tuple[str, object]:
    soft_as, hard_as = resource.getrlimit(resource.RLIMIT_AS)
    soft_cpu, hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)
    try:
        call, memory_mb, timeout = pickle.loads(data)
        if memory_mb > 0:
            limit = memory_mb * MB if hard_as == resource.RLIM_INFINITY else min(memory_mb * MB, hard_as)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard_as))
        # A backstop should the parent be gone and unable to stop us: the kernel ends a runaway
        # parse with SIGXCPU a little after its wall-time limit.
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime + timeout) + 5
        if hard_cpu == resource.RLIM_INFINITY or cpu < hard_cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, hard_cpu))
        reply: tuple[str, object] = ("ok", call())
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the parent
        reply = ("memory", None) if _is_memory(exc) else ("raise", _portable(exc))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft_as, hard_as))
        resource.setrlimit(resource.RLIMIT_CPU, (soft_cpu, hard_cpu))
    return reply


def _is_memory(exc: BaseException | None) -> bool:
    """A MemoryError anywhere in the chain, or a C library's allocation failure (libxml2's)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError):
            return True
        try:
            if "memory allocation failed" in str(exc).lower():
                return True
        except Exception:  # noqa: BLE001 - an exception whose str() fails is not a memory error
            pass
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _portable(exc: BaseException) -> Exception:
    """`exc` if it survives pickling as itself, else a LoadError that says what it was."""
    if isinstance(exc, Exception):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001
            pass
    text = str(exc).strip().splitlines()
    return LoadError(f"the parser failed: {exc.__class__.__name__}{': ' + text[0][:120] if text else ''}")


def _write(fd: int, obj: object) -> None:
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - a result that does not pickle still gets an answer
        data = pickle.dumps(("raise", LoadError(f"the parser's result could not be sent: {exc.__class__.__name__}")))
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        piece = os.read(fd, min(n - len(buf), 1 << 20))
        if not piece:
            return None
        buf += piece
    return bytes(buf)
