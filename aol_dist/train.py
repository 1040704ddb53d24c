"""Entry point: ``accelerate launch --config_file launch_configs/<name>.yaml -m aol_dist.train
--config configs/<run>.toml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from aol_dist import dist
from aol_dist.config import ConfigError, load_config
from aol_dist.loop import train


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
    world = dist.init_world()
    try:
        train(config, world)
    finally:
        dist.shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
