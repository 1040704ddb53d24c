"""Run the study's grid: each run is ``aol_dist.train.main(["--config", PRESET, *overrides])`` in a process of
its own (the entry point of ``accelerate launch -m aol_dist.train`` and ``python -m aol_dist.train``), one
process and one thread per run, ``parallel`` of them side by side; one row per finished run appended to
``results.csv``, each run's output in ``runs/<benchmark>/<run>.log``.

``launch="fork"`` (default) forks each run from a server process that has imported the training code once
(``multiprocessing`` forkserver with preload): a fresh process per run without the 7-15 s of imports
(torch, torchmetrics) that ``launch="exec"``, ``python -m aol_dist.train ...`` as a subprocess, pays
every run. Both run the same ``main``; on this 2-core machine the imports alone would take a third of
the quick preset's 30 minutes.

Resumable like a sweep: a run whose directory exists under its final name has finished (the training loop
renames ``<run>.incomplete`` only at the very end) and is not run again; if the study was killed between
that rename and its CSV row, the row is added from the run directory. A run killed half-way is started
again with ``train.resume=auto`` (from its last checkpoint, if it wrote one).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from aol_dist.lifeline import end_with
from aol_dist.study.benchmarks import TEST_SPLIT
from aol_dist.study.grid import Run

COLUMNS = ("benchmark", "method", "seed", "metric", "value", "steps", "seconds", "run_dir")
#: Launcher variables a run must not inherit: each run is a single process of its own.
_LAUNCHER_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "SLURM_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


# --------------------------------------------------------------------------- results.csv


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` (seed as int, value as float or None when the metric is missing). A last line
    cut short by a kill is dropped (and removed from the file, so the next append starts a clean line)."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    rows = []
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        if None in row or any(row.get(c) is None for c in COLUMNS):
            raise ValueError(f"{path}:{line}: expected the columns {', '.join(COLUMNS)}")
        try:
            rows.append({**row, "seed": int(row["seed"]), "value": float(row["value"]) if row["value"] else None,
                         "steps": int(row["steps"]) if row["steps"] else None,
                         "seconds": float(row["seconds"]) if row["seconds"] else None})
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row (with the header if the file is new), flushed to disk before returning."""
    new = not path.is_file() or path.stat().st_size == 0
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow({c: _cell(row.get(c)) for c in COLUMNS})
    with open(path, "a") as f:
        f.write(out.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def read_metric(run_dir: Path, metric: str, split: str = TEST_SPLIT) -> float | None:
    """The run's metric against truth on ``split``: mean AUROC over findings, or top-1 accuracy (``accuracy``
    in ``auc_<split>.json``, written by evaluation on multi-class data). None where the run has no such value."""
    path = run_dir / f"auc_{split}.json"
    result = json.loads(path.read_text())
    if metric == "auroc":
        value = result.get("mean_auc", {}).get("truth")
    else:
        accuracy = result.get("accuracy")
        value = accuracy.get("truth") if isinstance(accuracy, dict) else None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def result_row(run: Run, seconds: float | None) -> dict[str, Any]:
    steps = tomllib.loads((run.final_dir / "config.toml").read_text()).get("train", {}).get("steps")
    return {"benchmark": run.benchmark, "method": run.method, "seed": run.seed, "metric": run.metric,
            "value": read_metric(run.final_dir, run.metric), "steps": steps, "seconds": seconds,
            "run_dir": str(run.final_dir)}


# --------------------------------------------------------------------------- running


def child_env(slot: int, gpus: int) -> dict[str, str]:
    """The environment of one run: one thread, no launcher variables, one GPU (slot's) where there are GPUs."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def train_argv(run: Run, preset_toml: Path) -> list[str]:
    """The run's arguments to the training entry point."""
    return ["--config", str(preset_toml), *run.overrides, f"train.out_dir={run.out_dir}", f"train.run_name={run.name}",
            "train.resume=auto"]


def command(run: Run, preset_toml: Path) -> list[str]:
    """The run as a command line (``launch="exec"``, ``--dry-run``)."""
    return [sys.executable, "-m", "aol_dist.train", *train_argv(run, preset_toml)]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the study dies (even by SIGKILL), so no orphan run goes on
    writing a run directory that the next study would start again (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _forked_main(argv: list[str], log: str, env: dict[str, str], study: int) -> None:
    """A forked run (``launch="fork"``): its own environment and log, one thread, then the training entry point;
    it ends when the study (process ``study``) ends."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _die_with_parent()
    end_with(study)  # its parent is the fork server, which outlives the study: watch the study itself
    import torch

    torch.set_num_threads(1)  # torch was imported by the server, before OMP_NUM_THREADS could say so
    from aol_dist.train import main

    sys.exit(main(argv))


class _Process:
    """One running run, started either way, behind one small interface."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], launch: str) -> None:
        self.log = None
        if launch == "exec":
            self.log = open(log, "w")
            self.proc: Any = subprocess.Popen([sys.executable, "-m", "aol_dist.train", *argv], stdout=self.log,
                                              stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        elif launch == "fork":
            self.proc = _fork_context().Process(target=_forked_main, args=(argv, str(log), env, os.getpid()))
            self.proc.start()
        else:
            raise ValueError(f"launch must be fork or exec, got {launch!r}")

    def poll(self) -> int | None:
        return self.proc.poll() if self.log else self.proc.exitcode

    def stop(self, timeout: float = 30.0) -> None:
        self.proc.terminate()
        if self.log:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()
        else:
            self.proc.join(timeout)
            if self.proc.exitcode is None:
                self.proc.kill()

    def close(self) -> None:
        """After the run has ended: release its log (exec) or reap the process (fork)."""
        if self.log:
            self.log.close()
        else:
            self.proc.join()


_context = None


def _fork_context():
    global _context
    if _context is None:
        import multiprocessing

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["aol_dist.train"])
    return _context


@dataclass
class _Running:
    run: Run
    proc: _Process
    slot: int
    start: float


def _exit_on_sigterm() -> Callable[[], None]:
    """While the grid runs, SIGTERM (``kill``, a scheduler's time limit) exits through ``finally``, which ends
    the running runs; returns what restores the previous handler. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_grid(runs: Sequence[Run], results: Path, preset_toml: Path, parallel: int, gpus: int = 0,
             say: Callable[[str], None] = print, launch: str = "fork") -> dict[str, Any]:
    """Run every unfinished run of ``runs``, ``parallel`` at a time; append a row per finished run.

    Returns counts: ``skipped`` (finished before), ``recovered`` (finished, row added now), ``ran``, ``failed``
    (their log files)."""
    recorded = {(r["benchmark"], r["method"], r["seed"]) for r in read_results(results)}
    todo, skipped, recovered = [], 0, 0
    for run in runs:
        if run.final_dir.is_dir():
            skipped += 1
            if run.key not in recorded:
                append_result(results, result_row(run, None))
                recovered += 1
        else:
            todo.append(run)
    say(f"{len(runs)} runs: {skipped} finished before, {len(todo)} to run, {max(1, parallel)} side by side")
    running: list[_Running] = []
    failed: list[str] = []
    done = 0
    restore = _exit_on_sigterm()
    try:
        while todo or running:
            while todo and len(running) < max(1, parallel):
                run = todo.pop(0)
                slot = min(set(range(max(1, parallel))) - {r.slot for r in running})
                run.out_dir.mkdir(parents=True, exist_ok=True)
                proc = _Process(train_argv(run, preset_toml), run.out_dir / f"{run.name}.log", child_env(slot, gpus),
                                launch)
                running.append(_Running(run, proc, slot, time.perf_counter()))
            time.sleep(0.2)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                r.proc.close()
                seconds = time.perf_counter() - r.start
                done += 1
                if r.proc.poll() == 0 and r.run.final_dir.is_dir():
                    row = result_row(r.run, seconds)
                    append_result(results, row)
                    value = "missing" if row["value"] is None else f"{row['value']:.4f}"
                    say(f"[{done}/{done + len(todo) + len(running)}] {r.run.benchmark} {r.run.method} seed "
                        f"{r.run.seed}: {r.run.metric} {value} ({seconds:.0f} s)")
                else:
                    failed.append(str(r.run.out_dir / f"{r.run.name}.log"))
                    say(f"[{done}/{done + len(todo) + len(running)}] {r.run.benchmark} {r.run.method} seed "
                        f"{r.run.seed}: FAILED (exit {r.proc.poll()}), log {failed[-1]}")
    finally:
        for r in running:  # interrupted: end the runs this study started (they restart on the next call)
            r.proc.stop()
        restore()
    return {"skipped": skipped, "recovered": recovered, "ran": done - len(failed), "failed": failed}
