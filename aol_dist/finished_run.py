"""A finished run beside the shards it is applied to (``aol eval``, ``aol audit``): every mismatch between the
two named before any work, in one place, so that both commands refuse the same things the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aol_dist.config import Config
from aol_dist.errors import UserError


class RunInputError(UserError, ValueError):
    """A finished run and shards that do not go together, or a run that is not finished."""


@dataclass
class FinishedRun:
    config: Config
    """The run's config, ``data.shards`` resolved as training resolved it (:func:`run_relative`)."""
    checkpoint: dict[str, Any]
    """model.pt: weights, findings, label sets."""
    shard_dir: Path
    manifest: dict[str, Any]
    label_sets: list[str]
    """The run's label sets that the shards hold (every one of them where ``all_label_sets``)."""
    index: list[int]
    """Their columns in the shards' labels."""
    train_manifest: dict[str, Any] | None
    """The manifest of the shards the run trained on (``config.data.shards``); None where it cannot be read."""


def open_finished_run(run: Path, shards: str | None, splits: list[str], all_label_sets: bool) -> FinishedRun:
    """``run`` (a finished run directory) on ``shards`` (default: the run's own), or a :class:`RunInputError`
    naming the file or the value: not a finished run, unreadable config or manifest, a missing split, images
    of another size or channel count, other report tokens, other findings, missing label sets."""
    from aol_dist.checkpoint import unusable_run
    from aol_dist.config import ConfigError, load_run_config
    from aol_dist.data.convert.tokenize import TokenizerMismatch, check_tokenizer
    from aol_dist.data.shards import ShardError, read_manifest

    problem = unusable_run(run)
    if problem:
        raise RunInputError(problem)
    try:
        config = load_run_config(run / "config.toml")
    except ConfigError as e:
        raise RunInputError(f"{run / 'config.toml'}: {e}") from None
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, shards=str(run_relative(config.data.shards, run))))
    shard_dir = Path(shards or config.data.shards)
    try:
        manifest = read_manifest(shard_dir)
    except (OSError, ValueError, ShardError) as e:
        raise RunInputError(f"{shard_dir}: cannot read the shards' manifest ({e}); give --shards DIR") from None
    for split in splits:
        if split not in manifest["splits"]:
            raise RunInputError(f"{shard_dir}: no split {split!r}; it has {', '.join(manifest['splits'])}")
    try:
        train_manifest = read_manifest(config.data.shards)
    except (OSError, ValueError, ShardError):
        train_manifest = None
    trained_on = train_manifest or manifest  # the training shards moved away: nothing to compare with
    for key in ("image_size", "channels"):
        if trained_on.get(key, 1) != manifest.get(key, 1):
            raise RunInputError(f"{shard_dir} holds images of {key} {manifest.get(key, 1)}, the run trained on "
                                f"{trained_on.get(key, 1)} ({config.data.shards}): convert the split at the run's size")
    try:
        check_tokenizer(manifest, config.model.text_encoder, where=str(shard_dir))
    except TokenizerMismatch as e:
        raise RunInputError(str(e)) from None
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    if list(manifest["findings"]) != list(checkpoint["findings"]):
        raise RunInputError(f"{shard_dir}: findings {manifest['findings']} differ from the run's {checkpoint['findings']}")
    names = [n for n in checkpoint["label_sets"] if n in manifest["label_sets"]]
    if all_label_sets and len(names) < len(checkpoint["label_sets"]):
        missing = [n for n in checkpoint["label_sets"] if n not in names]
        raise RunInputError(f"{shard_dir}: label sets {missing} of the run are not in the shards' "
                            f"{manifest['label_sets']}; the audit needs every label set the run trained on")
    return FinishedRun(config, checkpoint, shard_dir, manifest, names, [manifest["label_sets"].index(n) for n in names],
                       train_manifest)


def run_relative(path: str, run: Path) -> Path:
    """A relative shard path of a run's config: as given where it exists from here, else from the directory
    that holds the run's out_dir (``runs/<name>`` -> ``.``), where training resolved it."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    beside = run.resolve().parent.parent / given
    return beside if beside.exists() else given
