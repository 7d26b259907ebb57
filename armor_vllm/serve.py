"""Run ``vllm serve`` as a child process on a loopback port, wait until it is healthy, and stop it:
what the demo, the end-to-end tests and the load test share. It runs the very command a user types
(``vllm serve DIR --quantization armor ...``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from armor_vllm.hardware import AVX512_CORE, cpu_flags

HOST = "127.0.0.1"
# Sized for a 2-core, CPU-only machine; on a GPU machine pass your own arguments.
CPU_DEFAULT_ARGS = ("--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--enforce-eager")
# without AVX-512 vLLM falls back to torch's bf16 linear, which measured 4x slower than float32
# (BENCHMARKS.md, section 3): there the CPU default is float32.


def cpu_default_args(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """``CPU_DEFAULT_ARGS``, plus ``--dtype float32`` on a CPU without AVX-512 (where bf16 is slow)."""
    flags = cpu_flags() if flags is None else flags
    return CPU_DEFAULT_ARGS if AVX512_CORE <= flags else (*CPU_DEFAULT_ARGS, "--dtype", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [shutil.which("vllm") or "vllm"]


class VllmServer:
    """``with VllmServer(model_dir) as server: server.base_url`` ... ; the log goes to ``log_path``."""

    def __init__(
        self,
        model_dir: str | Path,
        port: int | None = None,
        extra_args: tuple[str, ...] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 600.0,
        env: dict | None = None,
        served_name: str = "armor",
        quantization: str | None = "armor",
    ):
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.extra_args = list(cpu_default_args() if extra_args is None else extra_args)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.served_name = served_name
        self.quantization = quantization  # None for a dense model (vLLM refuses armor without its config)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def command(self) -> list[str]:
        quant = ["--quantization", self.quantization] if self.quantization else []
        return [
            *vllm_command(),
            "serve",
            self.model_dir,
            *quant,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--served-model-name",
            self.served_name,
            *self.extra_args,
        ]

    def start(self) -> "VllmServer":
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {self.proc.returncode} before it was healthy"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy after {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
