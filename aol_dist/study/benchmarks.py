"""The built-in benchmarks of ``aol study``: one declarative table (:data:`BENCHMARKS`) that the study and
the tests read, and :func:`build_benchmark`, which turns any row into a shard directory.

A row names its builder and that builder's options, the metric the study reads, and the files it needs
from the shared data folder (``$AOL_SHARED_DATA``, else ``../shared/data`` beside the repository). A row
whose files are absent is skipped with a message naming them; nothing is ever downloaded.

Builders: ``synth`` (the built-in chest-radiograph-like data and its four NLP label sets,
:func:`aol_dist.data.build.build_synth`), ``one_clean`` and ``instance`` (:mod:`.synthetic`: other label
sets on the same images and truth), ``generic`` (the generic converter,
:func:`aol_dist.data.convert.generic.convert_generic`, with the row's options as its keyword arguments;
options named in ``files`` are paths under the shared data folder).

Splits: the synthetic rows write ``train`` and ``test`` (sizes and image side from the preset's
:class:`Scale`). The CIFAR rows use the 10,000 CIFAR-10 test images (the only CIFAR images in the shared
folder) in a fixed split: the converter's permutation seeded by ``seed = 0`` puts 2,000 images in
``test`` (clean original labels as ``truth``) and 8,000 in ``train`` (the noisy label sets; the paper
trained on the 50,000 training images and evaluated on these 10,000).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHARED_DATA_ENV = "AOL_SHARED_DATA"
SPEC_FILE = "benchmark.json"
#: Split the study evaluates; every builder writes it with truth.
TEST_SPLIT = "test"


@dataclass(frozen=True)
class Benchmark:
    name: str
    metric: str
    """auroc: mean AUROC against truth over the findings; accuracy: top-1 accuracy against truth (multi-class)."""
    builder: str
    """synth, one_clean, instance or generic (see the module docstring)."""
    about: str
    """One line: what it tests."""
    options: dict[str, Any] = field(default_factory=dict)
    """The builder's options (for generic: ``convert_generic`` keyword arguments)."""
    files: tuple[str, ...] = ()
    """Options that are paths under the shared data folder (needed: the row is skipped without them)."""
    settings: tuple[str, ...] = ()
    """Config overrides every run of this benchmark adds (``section.key=value``)."""


_CIFAR = {"npz": "cifar10-test/cifar10_test.npz", "npz_truth": "y", "classes": "cifar10", "color": "rgb",
          "test_fraction": 0.2, "seed": 0}

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("synth-cxr", "auroc", "synth", "the built-in chest-radiograph-like data: two simulated NLP labelers, "
              "uncertain mentions as 0 or 1 (negbio_u0/u1, chexpert_u0/u1)", {"seed": 0}),
    Benchmark("cifar10-paper", "accuracy", "generic", "paper 000 A.2.1 / Table 2 on real CIFAR-10 images: HS 30 %, "
              "SF 40 %, OC 50 %, AD 100 %, AVG 45 % simulated annotators",
              # avg:0.26667 = mean of HS, SF, OC at 26.7 % and AD: noise 45 % as Table 2 lists. The average of
              # the four listed annotators (30/40/50/100 %), as A.2.1 words it, would be 55 %.
              {**_CIFAR, "dataset": "cifar10-paper", "annotators": ("hs:0.3", "sf:0.4", "oc:0.5", "ad", "avg:0.26667")},
              files=("npz",)),
    Benchmark("cifar10h", "accuracy", "generic", "real human label noise: 3 annotators per image drawn from the "
              "CIFAR-10H votes, truth = the original CIFAR-10 label",
              {**_CIFAR, "dataset": "cifar10h", "votes": "cifar10-test/cifar10h-counts.npy", "vote_annotators": 3},
              files=("npz", "votes")),
    Benchmark("one-clean", "auroc", "one_clean", "one clean label set among three that flip 40 % of entries: "
              "the sanity check every method must pass", {"seed": 0, "flip": 0.4, "corrupted": 3, "clean_position": 2}),
    Benchmark("instance", "auroc", "instance", "set A right on images with a bright corner mark, B right on the "
              "rest, systematic misses and false positives elsewhere: per-sample choice of labels",
              {"seed": 0, "cue_fraction": 0.5, "miss": 0.8, "false_positive": 0.4}),
)}


@dataclass(frozen=True)
class Scale:
    """How big a benchmark's shards are (the preset's; the tests use tiny ones)."""

    image_size: int = 32
    """Synthetic image side; the CIFAR rows keep their native 32 x 32, as the paper (Sec. 5.1)."""
    train: int = 3000
    """Synthetic training studies."""
    test: int = 1000
    """Synthetic test studies."""
    images: int = 0
    """CIFAR rows: only the first ``images`` images of the npz (0 = all 10,000); for tests."""
    samples_per_shard: int = 250


class BenchmarkUnavailable(RuntimeError):
    """The benchmark's files are not in the shared data folder."""


def shared_data_dir() -> Path:
    """``$AOL_SHARED_DATA``, else ``../shared/data`` beside the repository holding this package."""
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV])
    import aol_dist

    return (Path(aol_dist.__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def missing_files(bench: Benchmark, data_dir: Path | None = None) -> list[Path]:
    data_dir = data_dir or shared_data_dir()
    return [data_dir / bench.options[key] for key in bench.files if not (data_dir / bench.options[key]).is_file()]


def spec(bench: Benchmark, scale: Scale) -> dict[str, Any]:
    """What a shard directory was built from; a directory built from another spec is not reused."""
    used = asdict(scale)
    if bench.builder == "generic":
        used = {"images": scale.images, "samples_per_shard": scale.samples_per_shard}
    return json.loads(json.dumps({"benchmark": bench.name, "builder": bench.builder, "options": bench.options,
                                  "scale": used}))


def build_benchmark(name: str, out: str | Path, scale: Scale = Scale(), workers: int = 1,
                    data_dir: Path | None = None) -> dict[str, Any]:
    """Build benchmark ``name`` into ``out`` (resumable) or reuse it when built from the same spec; returns the
    manifest. Raises :class:`BenchmarkUnavailable` when its files are absent, ``ValueError`` when ``out``
    holds a build of another spec."""
    from aol_dist.data.shards import MANIFEST, read_manifest
    from aol_dist.writes import atomic_write_text

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench, out = BENCHMARKS[name], Path(out)
    data_dir = data_dir or shared_data_dir()
    missing = missing_files(bench, data_dir)
    if missing:
        raise BenchmarkUnavailable(f"{name}: skipped, {', '.join(map(str, missing))} not found "
                                   f"(set {SHARED_DATA_ENV} to the folder holding {', '.join(bench.options[k] for k in bench.files)})")
    wanted = spec(bench, scale)
    spec_path = out / SPEC_FILE
    if spec_path.is_file():
        built = json.loads(spec_path.read_text())
        if built != wanted:
            raise ValueError(f"{out}: built from another spec ({spec_path}: {built}), this run wants {wanted}; "
                             f"remove the directory or use another --out")
        if (out / MANIFEST).is_file():
            return read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_path, json.dumps(wanted, indent=1))
    _build(bench, out, scale, workers, data_dir)
    return read_manifest(out)


def _build(bench: Benchmark, out: Path, scale: Scale, workers: int, data_dir: Path) -> None:
    options = dict(bench.options)
    if bench.builder == "synth":
        from aol_dist.data.build import build_synth

        build_synth(out, scale.train, 0, scale.test, scale.image_size, options["seed"], scale.samples_per_shard, workers)
    elif bench.builder in ("one_clean", "instance"):
        from aol_dist.study.synthetic import build_derived

        seed = options.pop("seed")
        build_derived(out, bench.builder, options, scale.image_size, scale.train, scale.test, seed,
                      scale.samples_per_shard, workers)
    elif bench.builder == "generic":
        from aol_dist.data.convert.generic import convert_generic

        for key in bench.files:
            options[key] = str(data_dir / options[key])
        if scale.images:
            options.update(_subset(options, bench.files, scale.images, out / "source"))
        convert_generic(out, **options, samples_per_shard=scale.samples_per_shard, workers=workers)
    else:
        raise ValueError(f"benchmark {bench.name}: unknown builder {bench.builder!r}")


def _subset(options: dict[str, Any], files: tuple[str, ...], n: int, folder: Path) -> dict[str, str]:
    """The first ``n`` images (and vote rows) of the npz rows' files, written to ``folder``: tiny builds."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key in files:
        path = Path(options[key])
        target = folder / path.name
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k][:n] for k in data.files}
            np.savez(target, **arrays)
        else:
            np.save(target, np.load(path, allow_pickle=False)[:n])
        out[key] = str(target)
    return out
