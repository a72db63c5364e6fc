"""The parent's handle on one configuration's worker process (edgeretina/bench/worker.py): JSON lines
over its stdin and stdout, its stderr kept in a log file for the message when it dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgeretina.bench.config import Setup
from edgeretina.errors import EdgeRetinaError

WORKER_MODULE = "edgeretina.bench.worker"


class WorkerProcess:
    def __init__(self, setup: Setup, image_list: Path, log_path: Path):
        self.setup = setup
        self.stderr_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS=str(setup.threads))
        command = [sys.executable, "-m", WORKER_MODULE, "--bundle", str(setup.bundle),
                   "--backend", setup.backend, "--threads", str(setup.threads), "--batch", str(setup.batch),
                   "--images", str(image_list)]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True, env=env)

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise EdgeRetinaError(f"worker exited ({self.process.returncode}): {self._last_stderr_line()}")
        message = json.loads(line)
        if "error" in message:
            raise EdgeRetinaError(message["error"])
        return message

    def request(self, **message) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def stop(self) -> float:
        """Ask for the worker's peak RSS and end it."""
        try:
            return float(self.request(op="stop")["peak_rss_mb"])
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _last_stderr_line(self) -> str:
        lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "no message"
