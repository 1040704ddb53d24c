"""Entry point: ``accelerate launch --config_file launch_configs/<name>.yaml -m aol_dist.train
--config configs/<run>.toml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from aol_dist import dist, lifeline
from aol_dist.config import ConfigError, load_config
from aol_dist.errors import UserError
from aol_dist.loop import train

PEER_GRACE_S = 3.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aol_dist.train", description=__doc__)
    parser.add_argument("--config", help="training config (TOML); defaults apply where it is silent")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 method.name=single")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if lifeline.launched():  # a rank ends with its launcher, even one killed by SIGKILL (docs/reliability.md)
        lifeline.end_with_parent()
    world = dist.init_world(config.train.collective_timeout_s)
    try:
        train(config, world)
    except Exception as e:  # noqa: BLE001 - name the rank, then leave at once (see fail)
        fail(world, e)
    dist.shutdown(world)
    return 0


def fail(world: dist.World, error: BaseException) -> None:
    """Report ``error`` naming this rank and exit non-zero without the clean shutdown.

    After a failed collective the process group may be unusable and a clean shutdown may wait for
    peers that are gone; exiting now lets the launcher end the other ranks.
    """
    # said in one line, naming the file: a failed write, shards or weights that do not fit, a refused config or
    # resume (aol_dist/errors.py); anything else keeps its traceback
    if not isinstance(error, UserError):
        traceback.print_exception(error)
    text = f"{type(error).__name__}: {error}"
    peers = collective_failure(error)
    if peers:
        text += " (a collective failed: another rank died or stopped responding)"
        diagnosis = dist.unresponsive_ranks(world)
        if diagnosis and world.is_main:
            text += f"; {diagnosis}"
    print(f"aol_dist.train: rank {world.rank} of {world.world_size} failed: {text}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if peers:  # let the launcher see the rank that died first: its summary names that one as the root cause
        time.sleep(PEER_GRACE_S)
    os._exit(1)


def collective_failure(error: BaseException) -> bool:
    """Whether ``error`` looks like a collective that failed because a peer died or hung. Input and config
    errors (ValueError: a refused resume names ``train.collective_timeout_s`` among the keys that may change)
    and failed writes are this rank's own."""
    from aol_dist.writes import WriteError

    if isinstance(error, (ValueError, WriteError)):
        return False
    text = f"{type(error).__name__}: {error}".lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset"))


if __name__ == "__main__":
    sys.exit(main())
