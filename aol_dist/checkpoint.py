"""Checkpoints: everything a run needs to continue exactly where it stopped, and the run directory.

Layout, inside the run's working directory ``<out_dir>/<name>.incomplete``::

    checkpoints/step-00001000/state.pt        rank 0: modules, optimizers, step, reader cursor,
                                              world size, train shards, resolved config
    checkpoints/step-00001000/rank-00000.pt   every rank: RNG states (torch, numpy, python, CUDA),
                                              its part of the log window, a parameter fingerprint

A checkpoint is written into ``.step-XXXXXXXX.tmp`` and renamed once every rank's file and the
state are in it, so a directory named ``step-*`` is always whole; only the newest
``train.keep_checkpoints`` are kept. The run directory must be on a filesystem every rank sees
(as on any SLURM cluster), because every rank writes its own file.

``train.resume``: rank 0 decides (new run, continue from a checkpoint, or nothing to do) and
broadcasts the decision, errors included, so no rank waits in a collective for a rank that stopped.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from aol_dist import dist as D
from aol_dist.config import WRITTEN_BEFORE, Config, to_toml
from aol_dist.errors import UserError
from aol_dist.writes import atomic_write_text, writing

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")

# Keys that may differ between a checkpoint's config and the resuming run's: none changes the
# parameters a step produces. Everything else must match, or the run would not be the same run.
RESUMABLE_CHANGES = {
    "data.shards", "data.eval_splits",  # the train shards themselves are compared by name and size
    "train.steps", "train.resume", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.eval_batch_size", "train.log_every", "train.out_dir", "train.run_name", "train.nan_policy",
    "train.max_skipped_steps", "train.collective_timeout_s", "train.tensorboard", "train.plots", "train.debug_fault",
}


def step_of(checkpoint: Path) -> int:
    match = _NAME.match(checkpoint.name)
    if not match:
        raise RunRefused(f"{checkpoint} is not a checkpoint directory (step-XXXXXXXX)")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The whole checkpoints of a run directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.pt").is_file()), key=step_of)


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------- RNG

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generator states, as plain tensors and tuples (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def fingerprint(modules: dict[str, nn.Module]) -> list[float]:
    """Per-tensor float64 sums of every parameter and buffer: equal on ranks whose models are equal."""
    with torch.no_grad():
        return [float(t.double().sum()) for m in modules.values() for t in m.state_dict().values()
                if t.is_floating_point()]


# --------------------------------------------------------------------------------------- save, load

def save(run_dir: Path, step: int, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         config: Config, world: D.World, cursor: tuple[int, int], train_shards: list[tuple[str, int]],
         rank_state: dict[str, Any], write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it at the same step). ``cursor`` is the
    reader's position after the step: (epoch, batch within the epoch) of the next batch.
    ``write_extra(tmp_dir)`` runs on every rank (DeepSpeed writes its partitioned optimizer state)."""
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    with writing(final, tmp):  # a full disk: one line naming the checkpoint, the temporary directory removed
        tmp.mkdir(parents=True, exist_ok=True)
        if write_extra is not None:
            write_extra(tmp)
        torch.save({**rank_state, "rng": rng_state(world.device), "fingerprint": fingerprint(modules)},
                   tmp / f"rank-{world.rank:05d}.pt")
    D.barrier(world)
    if world.is_main:
        prints = [torch.load(tmp / f"rank-{r:05d}.pt", weights_only=True)["fingerprint"] for r in range(world.world_size)]
        differ = [r for r in range(1, world.world_size) if prints[r] != prints[0]]
        if differ:  # the invariant of SPEC 3.7 is broken: a checkpoint would hide it
            raise RuntimeError(f"step {step}: ranks {differ} hold parameters different from rank 0's")
        with writing(final, tmp):
            torch.save({"step": step, "cursor": list(cursor), "world_size": world.world_size,
                        "train_shards": [list(s) for s in train_shards], "config": config.to_dict(),
                        "modules": {k: m.state_dict() for k, m in modules.items()},
                        "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}, tmp / "state.pt")
        if final.exists():  # the same step written again after a resume from an older checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-config.train.keep_checkpoints]:
            shutil.rmtree(old)
    return final


def load(checkpoint: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         config: Config, world: D.World, train_shards: list[tuple[str, int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``checkpoint`` into the modules and optimizers; returns (state without weights, this rank's state).

    Refuses a checkpoint from another world size (the data order depends on it), other training
    shards, or a config that differs outside :data:`RESUMABLE_CHANGES`.
    """
    state = torch.load(checkpoint / "state.pt", map_location=world.device, weights_only=True)
    if state["world_size"] != world.world_size:
        raise RunRefused(f"{checkpoint} was written by {state['world_size']} ranks; this job has "
                         f"{world.world_size}. Resume with the same number of processes (the data order depends on it)")
    if [tuple(s) for s in state["train_shards"]] != [tuple(s) for s in train_shards]:
        raise RunRefused(f"{checkpoint}: the training shards (names, sample counts) differ from data.shards")
    changed = config_changes(state["config"], config.to_dict())
    if changed:
        raise RunRefused(f"{checkpoint}: config differs in {changed}; only {sorted(RESUMABLE_CHANGES)} may change on resume")
    missing = set(modules) ^ set(state["modules"])
    if missing:
        raise RunRefused(f"{checkpoint}: modules {sorted(state['modules'])} do not match this run's {sorted(modules)}")
    for name, module in modules.items():
        load_weights(module, state["modules"][name], checkpoint / "state.pt", name)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    rank_file = checkpoint / f"rank-{world.rank:05d}.pt"
    mine = torch.load(rank_file, map_location=world.device, weights_only=True)
    return {k: v for k, v in state.items() if k not in ("modules", "optimizers")}, mine


class RunRefused(UserError, ValueError):
    """A run this configuration may not start or continue (its directory exists, its checkpoint is from another
    world size, config or set of shards): said in one line, naming the directory or checkpoint."""


class WeightsMismatch(UserError, ValueError):
    """Saved weights that do not fit the modules this configuration builds."""


def load_weights(module: nn.Module, state: dict[str, Any], where: Path | str, name: str) -> None:
    """``module.load_state_dict(state)``, or a :class:`WeightsMismatch` naming the file and the parameters that
    do not fit (a run written by another version of aol_dist, whose modules this one builds differently)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        mine, saved = set(module.state_dict()), set(state)
        detail = "; ".join(f"{label}: {', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("not in the file", mine - saved), ("not in this version", saved - mine)) if keys)
        raise WeightsMismatch(f"{where}: the saved {name} does not fit the one this configuration builds "
                              f"({detail or str(error).splitlines()[-1].strip()}); was the run written by another "
                              f"version of aol_dist?") from error


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ, outside RESUMABLE_CHANGES; a key the saved config predates counts as the value
    the run trained with (config.WRITTEN_BEFORE)."""
    a = {**{f"{section}.{key}": v for (section, key), v in WRITTEN_BEFORE.items()}, **_flatten(saved)}
    b = _flatten(current)
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_CHANGES and _norm(a.get(k)) != _norm(b.get(k)))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


# ------------------------------------------------------------------------------------- run directory

@dataclass(frozen=True)
class RunDir:
    work: Path
    """``<out_dir>/<name>.incomplete``: where the run writes until it has finished."""
    final: Path
    """``<out_dir>/<name>``: the working directory is renamed to this at the end."""
    resume_from: Path | None = None
    """Checkpoint to continue from, or None for a new run."""
    finished: bool = False
    """``resume = "auto"`` found the run already finished: nothing to do."""


def open_run_dir(config: Config, world: D.World) -> RunDir:
    """Decide on rank 0 where this run writes and whether it resumes; the same answer on every rank."""
    decision: dict[str, Any]
    if world.is_main:
        try:
            decision = _decide(config)
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            decision = {"error": f"{type(e).__name__}: {e}"}
    else:
        decision = {}
    decision = D.broadcast_object(decision, world)
    if "error" in decision:
        raise RunRefused(decision["error"])
    D.barrier(world)
    return RunDir(Path(decision["work"]), Path(decision["final"]),
                  Path(decision["resume_from"]) if decision["resume_from"] else None, decision["finished"])


def git_revision() -> str:
    """The checkout's commit (with ``-dirty`` if modified), or ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _decide(config: Config) -> dict[str, Any]:
    tc = config.train
    explicit = None
    if tc.resume not in ("", "latest", "auto"):
        explicit = Path(tc.resume)
        if not (explicit / "state.pt").is_file():  # a run directory: its newest checkpoint
            explicit = latest(explicit)
            if explicit is None:
                raise FileNotFoundError(f"train.resume: no checkpoint in {tc.resume}")
    name = tc.run_name or (explicit.parent.parent.name.removesuffix(".incomplete") if explicit else "") or \
        f"{config.method.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    final = Path(tc.out_dir) / name
    work = final.with_name(name + ".incomplete")
    decision = {"work": str(work), "final": str(final), "resume_from": None, "finished": False}
    if final.exists():
        if tc.resume == "auto":  # a requeued job whose run had already finished
            print(f"run {final} has finished; nothing to resume", flush=True)
            return {**decision, "finished": True}
        raise FileExistsError(f"run directory {final} exists; choose another train.run_name")
    found = explicit or (latest(work) if tc.resume in ("latest", "auto") else None)
    if tc.resume == "latest" and found is None:
        raise FileNotFoundError(f"train.resume = latest: no checkpoint in {work / CHECKPOINTS}")
    if tc.resume == "" and latest(work) is not None:
        raise FileExistsError(f"{work} holds checkpoints of an unfinished run: continue it with train.resume=latest "
                              f"(or auto), or choose another train.run_name")
    work.mkdir(parents=True, exist_ok=True)
    for partial in (work / CHECKPOINTS).glob(".step-*.tmp"):  # a checkpoint a crash interrupted
        shutil.rmtree(partial)
    atomic_write_text(work / "config.toml", to_toml(config, git_revision()))
    _truncate_log(work / "log.jsonl", step_of(found) if found else 0)
    if found:
        print(f"resuming from {found}", flush=True)
    return {**decision, "resume_from": str(found) if found else None}


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to ``step``: the steps after the checkpoint will be logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def unusable_run(run: Path) -> str | None:
    """Why ``run`` cannot be evaluated or audited (one line), or None."""
    if run.name.endswith(".incomplete") or (not run.exists() and run.with_name(run.name + ".incomplete").exists()):
        return (f"{run}: the run has not finished (its directory is renamed from .incomplete when it ends); "
                f"resume it with train.resume=latest or evaluate a finished run")
    for name in ("config.toml", "model.pt"):
        if not (run / name).is_file():
            return f"{run}: no {name}; give a finished run directory (one that holds config.toml and model.pt)"
    return None
