"""What ``aol study`` runs: the methods table, the presets, and the plan (one run per benchmark, method, seed).

A method row is a label and the config overrides that make it; ``{label_set}`` in a row expands to one
row per label set of the benchmark (``single:<label set>``); ``{gold_studies}`` is :data:`GOLD_STUDIES`, or a
tenth of the benchmark's training split where that is fewer (the smoke preset's tiny shards). Adding a variant is one line in
:data:`METHODS`, e.g. ``Method("aol:paper", ("method.name=aol", "method.trust=attention"))``.
Labels are the method name, and ``name:variant`` for variants.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from aol_dist.config import split_override
from aol_dist.study.benchmarks import TEST_SPLIT, Benchmark, Scale


@dataclass(frozen=True)
class Method:
    label: str
    overrides: tuple[str, ...]
    default: bool = True
    """Run when ``--methods`` is not given; the others run when named (variants studied on their own)."""


METHODS: tuple[Method, ...] = (
    Method("aol", ("method.name=aol",)),  # the defaults: trust = posterior, 2 regimes (method/trust.py)
    Method("aol:paper", ("method.name=aol", "method.trust=attention")),  # the paper's Eq. 2-5 (configs/paper_exact.toml)
    Method("aol:paper_per_finding", ("method.name=aol", "method.trust=attention", "method.attention=per_finding"),
           default=False),
    Method("aol:global", ("method.name=aol", "method.trust_input=none"), default=False),  # no per-sample head
    Method("aol:features", ("method.name=aol", "method.trust_input=features"), default=False),  # head on F
    Method("aol:free", ("method.name=aol", "method.monotone=false"), default=False),  # inverted sets allowed
    Method("aol:meta", ("method.name=aol", "method.trust_input=meta"), default=False),  # the head reads F_m (Eq. 1)
    Method("aol:independent", ("method.name=aol", "method.annotator=independent"), default=False),
    Method("aol:one_regime", ("method.name=aol", "method.regimes=1"), default=False),  # one global annotator model
    # the truth of {gold_studies} training studies (300, or a tenth of a smaller training split) fits the annotator
    # model (data.gold_split; benchmarks whose train split has truth)
    Method("aol:gold", ("method.name=aol", "data.gold_split=train", "data.gold_samples={gold_studies}"), default=False),
    Method("aol:regimes_free", ("method.name=aol", "method.regime_balance=0"), default=False),  # no balance term
    Method("single:{label_set}", ("method.name=single", "method.single_label_set={label_set}")),
    Method("majority", ("method.name=majority",)),
    Method("soft_average", ("method.name=soft_average",)),
    Method("cm", ("method.name=cm",)),
    Method("truth", ("method.name=truth",)),  # the ceiling: trains on the hidden truth
    # the ceiling of choosing among the label sets: the truth where some set gives it, else the majority vote
    Method("best_choice", ("method.name=best_choice",), default=False),
)

#: The baselines a method is compared with: the best mean among these is "the best baseline".
BASELINES = ("majority", "soft_average", "cm", "single:*")


#: The ceilings, trained with the hidden truth: no baseline, the bounds a method is read against.
CEILINGS = ("truth", "best_choice")


def is_baseline(label: str) -> bool:
    return any(fnmatch.fnmatchcase(label, pattern) for pattern in BASELINES)


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    scale: Scale
    settings: tuple[str, ...]
    """Config overrides every run shares (same step budget and settings for every method)."""
    seeds: int
    per_benchmark: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Overrides for every run of one benchmark (all its methods alike), after ``settings``."""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smoke", "the whole flow in minutes, numbers meaningless: tiny shards, 2 steps, one seed",
           Scale(image_size=32, train=64, test=64, images=300, samples_per_shard=32),
           ("model.arch=resnet_tiny", "method.lr=1e-3", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=16", "train.steps=2", "train.log_every=1", "train.eval_batch_size=64",
            "train.checkpoint_every=0", "train.keep_checkpoints=1", "train.plots=false"),
           seeds=1),
    # Sized in docs/quality.md: about 16 s a run on the synthetic rows, 21 s on CIFAR (aol:paper 2-4 times
    # that), two side by side. CIFAR gets 400 steps: at 300 its seed-to-seed spread of accuracy (0.03-0.07)
    # hid the gap to the truth; 600 (measured 2026-11-26) took the preset to 34 min, over its 30.
    Preset("quick", "CPU, 2 cores, <= 30 min: 32 px, ResNet-tiny, batch 32, 300 steps (CIFAR 400), one thread per run",
           Scale(image_size=32, train=3000, test=1000),
           ("model.arch=resnet_tiny", "method.lr=1e-3", "data.batch_size=32", "data.num_workers=0",
            "data.shuffle_buffer=256", "train.steps=300", "train.log_every=50", "train.eval_batch_size=250",
            "train.checkpoint_every=0", "train.keep_checkpoints=1", "train.plots=false"),
           seeds=3, per_benchmark={"cifar10-paper": ("train.steps=400",), "cifar10h": ("train.steps=400",)}),
    Preset("full", "GPUs, the paper's settings (Sec. 5.1): ResNet-50, 256 px synthetic images (CIFAR at its "
           "native 32 px), batch 32, Adam 1e-4, 10,000 steps",
           Scale(image_size=256, train=10000, test=2000),
           ("model.arch=resnet50", "method.lr=1e-4", "data.batch_size=32", "data.num_workers=4",
            "train.steps=10000", "train.log_every=50", "train.eval_batch_size=128", "train.checkpoint_every=2000",
            "train.keep_checkpoints=1", "train.plots=true"),
           seeds=3),
)}


@dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    benchmark: str
    method: str
    seed: int
    metric: str
    overrides: tuple[str, ...]
    """Overrides of this run on top of the preset's (benchmark, method, seed, where it writes)."""
    out_dir: Path
    """Parent of the run directory (``train.out_dir``)."""

    @property
    def name(self) -> str:
        return f"{self.method.replace(':', '-')}-s{self.seed}"

    @property
    def final_dir(self) -> Path:
        """The finished run: the training loop renames ``<name>.incomplete`` to this at the very end."""
        return self.out_dir / self.name

    @property
    def key(self) -> tuple[str, str, int]:
        return self.benchmark, self.method, self.seed


GOLD_STUDIES = 300
"""Hand-labelled studies of the ``aol:gold`` row: what docs/quality.md ("Fourth pass") measured enough."""


def gold_studies(shard_dir: Path) -> int:
    """:data:`GOLD_STUDIES`, or a tenth of the training split of the shards in ``shard_dir`` where that is fewer
    (shards not built yet: :data:`GOLD_STUDIES`; the run names what is missing)."""
    from aol_dist.data.shards import ShardError, read_manifest

    try:
        train = read_manifest(shard_dir)["splits"]["train"]["samples"]
    except (ShardError, KeyError):
        return GOLD_STUDIES
    return max(1, min(GOLD_STUDIES, train // 10))


def expand_methods(label_sets: Sequence[str], methods: Sequence[Method] = METHODS) -> list[Method]:
    """The method rows of one benchmark: ``{label_set}`` rows once per label set."""
    out = []
    for m in methods:
        if "{label_set}" in m.label:
            out += [Method(m.label.format(label_set=s), tuple(o.format(label_set=s) for o in m.overrides), m.default)
                    for s in label_sets]
        else:
            out.append(m)
    return out


def select(labels: Sequence[str], patterns: Sequence[str], defaults: Sequence[str] | None = None) -> list[str]:
    """Labels matching any pattern (exact or shell-style: ``single:*``, ``aol*``), in table order; without
    patterns, the ``defaults`` (all labels where None)."""
    if not patterns:
        return [label for label in labels if defaults is None or label in defaults]
    return [label for label in labels if any(fnmatch.fnmatchcase(label, p) for p in patterns)]


def impossible(patterns: Sequence[str], methods: Sequence[Method] = METHODS) -> list[str]:
    """The ``--methods`` patterns that no row can match whatever a benchmark's label sets are: a typo is named
    before any shards are built. A row with ``{label_set}`` (``single:{label_set}``) can match a pattern that
    agrees with it up to the first wildcard of either; whether ``single:hs`` exists is known from the shards."""
    def literal(text: str) -> str:
        return text[:min((i for i, c in enumerate(text) if c in "*?["), default=len(text))]

    def possible(pattern: str, m: Method) -> bool:
        if "{label_set}" not in m.label:
            return fnmatch.fnmatchcase(m.label, pattern)
        head, fixed = m.label.split("{label_set}")[0], literal(pattern)
        return fixed.startswith(head) or head.startswith(fixed)
    return [p for p in patterns if not any(possible(p, m) for m in methods)]


def plan(benchmarks: dict[str, tuple[Benchmark, Sequence[str], Path]], root: Path, seeds: int,
         patterns: Sequence[str] = (), methods: Sequence[Method] = METHODS,
         per_benchmark: dict[str, tuple[str, ...]] | None = None, extra: Sequence[str] = ()) -> list[Run]:
    """Every (benchmark, method, seed) run: ``benchmarks`` maps a name to (row, label sets, shard directory).
    A run's overrides, later ones winning: the benchmark's, the preset's for that benchmark
    (``per_benchmark``), the user's (``extra``), the method's, the seed. A pattern that matches no method
    of any benchmark is an error naming the known labels; so is a user's key that a chosen method row sets
    itself (the row's value would silently win)."""
    runs, known, used = [], [], set()
    user = {split_override(o)[0]: o for o in extra}
    for name, (bench, label_sets, shard_dir) in benchmarks.items():
        rows = expand_methods(label_sets, methods)
        labels = [m.label for m in rows]
        known += [label for label in labels if label not in known]
        chosen = set(select(labels, patterns, [m.label for m in rows if m.default]))
        used |= {p for p in patterns for label in chosen if fnmatch.fnmatchcase(label, p)}
        for m in rows:
            if m.label not in chosen:
                continue
            own = tuple(o.format(gold_studies=gold_studies(shard_dir)) if "{gold_studies}" in o else o
                        for o in m.overrides)
            clash = [(user[k], o) for o in own if (k := split_override(o)[0]) in user]
            if clash:
                raise ValueError(f"--set {clash[0][0]}: method row {m.label} sets {clash[0][1]} itself, which would "
                                 f"win; leave {m.label} out of --methods, or add a row to study/grid.py METHODS")
            for seed in range(seeds):
                overrides = (f"data.shards={shard_dir}", f"data.eval_splits={TEST_SPLIT}", *bench.settings,
                             *(per_benchmark or {}).get(name, ()), *extra, *own, f"train.seed={seed}")
                runs.append(Run(name, m.label, seed, bench.metric, overrides, root / "runs" / name))
    unused = [p for p in patterns if p not in used]
    if unused and benchmarks:
        raise ValueError(f"--methods {','.join(unused)}: matches no method; known: {', '.join(known)}")
    return runs
