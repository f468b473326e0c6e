"""A ``livelm serve`` process this tool starts on a free loopback port and stops again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``livelm serve`` in a child process bound to 127.0.0.1, for ``with`` blocks.

    The child gets its own session so that a Ctrl-C in the terminal reaches only the
    benchmark, which then stops the server itself after writing its results (instead of
    the server draining under it). Its log goes to a temporary file, shown on failure.
    """

    def __init__(self, model: str | None, serve_args: list[str] | None = None,
                 startup_timeout_s: float = 900.0) -> None:
        self.model = model
        self.serve_args = list(serve_args or [])
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="livelm-bench-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The child's command line."""
        cmd = [sys.executable, "-m", "livelm.entrypoints.serve_cli", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *self.serve_args]
        if self.model:
            cmd += ["--model", self.model]
        return cmd

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> LocalServer:
        """Start the child and wait until ``/health`` answers (model loading included)."""
        self.port = free_port()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"livelm serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"livelm serve did not come up in {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT (the server's clean shutdown), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
