"""Worker processes for the coverage sweep: each job runs in a subprocess with a timeout.

A worker (``python -m benchmarks.coverage --worker``) imports torch, timm and open_clip once and
then serves jobs read from stdin, one JSON line each, answering one ``@@ROW`` JSON line each.
When a job times out or its worker dies (a crash, the OOM killer), the worker is killed and
replaced, and the job gets a row saying so: one model costs one row, never the sweep.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PREFIX = "@@ROW "
RSS_LIMIT_KB = 8 * 1024 * 1024  # restart a worker whose resident memory grew past 8 GiB
READY = "ready"
START_TIMEOUT = 300.0  # for the imports of a fresh worker, not counted in any job's timeout


def serve(threads: int) -> None:
    """The worker loop: run each job read from stdin and print its row."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks.coverage_models import count_family
    from benchmarks.coverage_run import run_model

    sys.stdout.write(PREFIX + json.dumps(READY) + "\n")  # the imports are done
    sys.stdout.flush()
    for line in sys.stdin:
        job = json.loads(line)
        if job["tier"] == "count":
            result: Any = count_family(job["key"])
        else:
            result = run_model(job["key"], job["tier"])
        sys.stdout.write(PREFIX + json.dumps(result) + "\n")
        sys.stdout.flush()


class Worker:
    """One worker subprocess, its stdout read by a thread into a queue."""

    def __init__(self, threads: int, log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "benchmarks.coverage", "--worker", "--threads", str(threads)]
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            first = self.lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            first = None
        self.ready = first is not None and json.loads(first) == READY

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.lines.put(line[len(PREFIX):])
        self.lines.put(None)

    def ask(self, job: dict, timeout: float) -> tuple[Any, str | None]:
        """The job's result, or None and why there is none (timeout, crash)."""
        assert self.proc.stdin is not None
        if not self.ready:
            return None, f"crashed: the worker did not start ({self._tail()})"
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None, f"crashed: worker gone before the job ({self._tail()})"
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return None, f"timeout: no result within {timeout:.0f} s"
        if line is None:
            code = self.proc.wait()
            why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return None, f"crashed: worker {why} ({self._tail()})"
        return json.loads(line), None

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:])[-400:] or "no stderr"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def kill(self) -> None:
        """Kill this worker's process group (it was started in its own session)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def run_jobs(jobs: Iterable[dict], *, workers: int, threads: int, timeout: Callable[[dict], float],
             logdir: Path, on_result: Callable[[dict, Any, str | None], None]) -> None:
    """Run ``jobs`` on ``workers`` subprocesses; ``on_result(job, result, failure)`` is called
    from the calling thread as each job finishes."""
    todo: queue.Queue[dict | None] = queue.Queue()
    for job in jobs:
        todo.put(job)
    done: queue.Queue[tuple[dict, Any, str | None, float] | None] = queue.Queue()

    def slot(index: int) -> None:
        log = logdir / f"worker{index}.log"
        worker: Worker | None = None
        while (job := todo.get()) is not None:
            if worker is None or not worker.alive():
                worker = Worker(threads, log)
            start = time.perf_counter()
            result, failure = worker.ask(job, timeout(job))
            done.put((job, result, failure, time.perf_counter() - start))
            if failure or worker.rss_kb() > RSS_LIMIT_KB:
                worker.kill()
                worker = None
        if worker is not None:
            worker.close()
        done.put(None)

    for _ in range(workers):
        todo.put(None)
    threads_ = [threading.Thread(target=slot, args=(i,), daemon=True) for i in range(workers)]
    for t in threads_:
        t.start()
    running = workers
    while running:
        item = done.get()
        if item is None:
            running -= 1
            continue
        job, result, failure, seconds = item
        if failure is not None:
            job = {**job, "seconds": round(seconds, 2)}
        on_result(job, result, failure)
