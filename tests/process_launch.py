"""Launches a multi-process run of a script on this machine, as a cluster would on several hosts.

Each process is `python scripts/NAME ... --distributed --coordinator_address=localhost:PORT --num_processes=N
--process_id=I` with its own CPU devices (JAX_NUM_CPU_DEVICES, not the 8 of conftest.py) and its output in
LOGDIR/process_I.log. Every wait has a hard timeout that kills all the processes, so a hung collective fails a
test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Launch:
    """N processes of one script joined by a loopback coordinator."""

    def __init__(
        self, script: str, flags: Sequence[str], logdir: str, num_processes: int = 2, devices_per_process: int = 4
    ):
        os.makedirs(logdir, exist_ok=True)
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            JAX_NUM_CPU_DEVICES=str(devices_per_process),
            # The tests' persistent compilation cache: a relaunch does not compile again.
            JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".pytest_cache", "jax"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
            PYTHONPATH=REPO,
        )
        coordinator = f"localhost:{free_port()}"
        self.log_paths = [os.path.join(logdir, f"process_{i}.log") for i in range(num_processes)]
        self.processes = []
        for i, log_path in enumerate(self.log_paths):
            command = [sys.executable, os.path.join(REPO, "scripts", script), *flags, "--distributed"]
            command += [f"--coordinator_address={coordinator}", f"--num_processes={num_processes}", f"--process_id={i}"]
            with open(log_path, "w") as log:
                self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))

    def log(self, index: int) -> str:
        with open(self.log_paths[index], errors="replace") as f:
            return f.read()

    def logs(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.log(i)[-6000:]}" for i in range(len(self.processes)))

    def wait(self, timeout: float) -> None:
        """Waits for every process to exit 0; on a timeout or a failure kills them all and raises with the logs."""
        deadline = time.monotonic() + timeout
        try:
            for process in self.processes:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"The processes ran past {timeout} s and were killed.\n{self.logs()}") from None
        codes = [process.returncode for process in self.processes]
        if any(codes):
            self.kill_all()
            raise AssertionError(f"Exit codes {codes}.\n{self.logs()}")

    def wait_until(self, condition: Callable[[], bool], timeout: float, poll_s: float = 0.01) -> None:
        """Polls `condition` while every process runs; raises (killing them all) if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            exited = [i for i, process in enumerate(self.processes) if process.poll() is not None]
            if exited or time.monotonic() > deadline:
                self.kill_all()
                why = f"processes {exited} exited" if exited else f"{timeout} s passed"
                raise AssertionError(f"The awaited condition never held: {why}.\n{self.logs()}")
            time.sleep(poll_s)

    def kill(self, index: int) -> None:
        """SIGKILL for one process: no handler, no cleanup, as when a host dies."""
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait()

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
