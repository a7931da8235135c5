"""Helpers for tests that serve something on 127.0.0.1 or drive Debian's chromium."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags chromium keeps trying to reach Google's hosts, which
# this offline machine refuses; --no-sandbox because tests may run as root.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(app) -> tuple[str, Callable[[], None]]:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a thread: (base url, stop)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Return once `url` answers 200; RuntimeError if `proc` exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before {url} answered")
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:g} s")
        time.sleep(0.2)


REPO = Path(__file__).resolve().parents[1]


class MoeragServer:
    """`moerag serve` as a real process on 127.0.0.1 (the way users run it): url, pid, and the
    process's resident memory and CPU time read from /proc, for bounds on hostile requests."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None, timeout: float = 90) -> None:
        import os
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(home).parent / f"serve-{self.port}.log"
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    **(env or {})}
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), "--home", str(home)],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        try:
            wait_until_up(f"{self.url}/healthz", self.proc, timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"moerag serve did not start ({exc}):\n{self.output()}") from None

    def output(self) -> str:
        # Read from the file, not self._log: only the child writes to it, and stop() closes our handle.
        return self.log.read_text(errors="replace")[-4000:]

    def rss_mb(self) -> float:
        """Resident memory now, MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far."""
        import os

        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> "MoeragServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
