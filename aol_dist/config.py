"""One frozen, typed config tree: TOML file + ``section.key=value`` overrides, validated on load.

The resolved config is written into every run directory together with the git revision, so a run
can be reproduced from its directory alone.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from aol_dist.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    shards: str = "shards/synth"
    """Directory holding ``manifest.json`` and the tar shards (``aol shards ... --out DIR``)."""
    train_split: str = "train"
    """Split the model trains on."""
    eval_splits: tuple[str, ...] = ("test",)
    """Splits evaluated at the end (and every ``train.eval_every`` steps): AUC against truth and each label set."""
    label_sets: tuple[str, ...] = ()
    """Label sets the method uses, by name; empty means all label sets in the manifest."""
    batch_size: int = 32
    """Samples per rank per step (Sec. 5.1: 32)."""
    shuffle_buffer: int = 512
    """Samples held by each reader worker for shuffling."""
    num_workers: int = 1
    """DataLoader worker processes per rank; each reads a disjoint subset of the rank's shards."""
    gold_split: str = ""
    """Method aol with trust = posterior: a split of hand-labelled studies (truth in every sample) whose labels
    and truth fit the annotator model beside the noisy labels' likelihood, a batch of ``batch_size`` per step
    (data/gold.py). What settles which way an uncertain mention goes where the labels cannot (docs/quality.md,
    "Hand-labelled studies"). Its truth does not train the classifier directly. Empty: none."""
    gold_samples: int = 0
    """With ``gold_split``: use only its first this many studies (0: all of them; every rank holds them in memory)."""

    def validate(self) -> None:
        _require(self.gold_samples >= 0, "data.gold_samples must be >= 0")
        _require(not self.gold_samples or bool(self.gold_split),
                 f"data.gold_samples = {self.gold_samples} without data.gold_split: name the hand-labelled split")
        _require(self.batch_size >= 1, "data.batch_size must be >= 1")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers must be >= 0")
        _require(len(set(self.label_sets)) == len(self.label_sets), "data.label_sets has duplicates")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"
    """Backbone: resnet_tiny (CPU demo), resnet18, resnet34, resnet50 (the paper's), or timm/<ResNet-family name>."""
    pretrained: str = ""
    """Local path of ImageNet weights (a torchvision state dict); empty = random init. Never downloaded."""
    checkpointing: bool = False
    """Gradient checkpointing per backbone stage: recompute activations in backward, less memory."""
    text_encoder: str = ""
    """Image+text mode (Sec. 3.3): local path of a Hugging Face BERT-family checkpoint (frozen, eval mode)
    whose pooled report vector feeds two FC-512 layers concatenated with the image feature; empty = image only."""

    def validate(self) -> None:
        from aol_dist.model.backbone import ARCHS, known_arch

        _require(known_arch(self.arch), f"model.arch must be one of {sorted(ARCHS)} or timm/<name>, got {self.arch!r}")
        _require(not self.pretrained or Path(self.pretrained).is_file(), f"model.pretrained: no file {self.pretrained!r}")
        _require(not self.text_encoder or Path(self.text_encoder).is_dir(),
                 f"model.text_encoder: no directory {self.text_encoder!r}")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "aol"
    """aol (attention-on-label), single (``single_label_set``), majority, soft_average, cm (paper 002); ceilings:
    truth (the split's truth), best_choice (the truth where some label set gives it, else the majority vote)."""
    meta_lr: float = 0.2
    """alpha of Eq. 1: step size of the per-label-set meta update."""
    lr: float = 1e-4
    """beta of Eq. 4: Adam learning rate of the classifier."""
    attention_lr: float = 0.05
    """SGD learning rate of W_attn, b_attn (Eq. 5 writes beta; Listing 1 uses a separate attn_lr)."""
    k: float = 50.0
    """Sharpness of the differentiable binarization (Eq. 3)."""
    threshold: float = 0.5
    """T of Eq. 3; Listing 1 uses 0.1 with its mean combination."""
    combine: str = "text"
    """text: y_bar = sum_m w_m y_m (Sec. 3.2); listing: mean_m w_m y_m (Listing 1, A.6)."""
    attention: str = "per_set"
    """per_set: one weight per label set and sample (Eq. 2); per_finding: one per label set, finding and sample."""
    single_label_set: str = ""
    """Label set used by method ``single``; empty = the first one."""
    meta_scope: str = "full"
    """full: meta-update all parameters (the paper). partial: only the last stage, text layers and head,
    meta forwards from the cached activation before the last stage (an approximation, cheaper)."""
    fast: bool = True
    """Fast meta step (proven equal to the reference by the tests); false = the reference, reads like Alg. 1."""
    batched_last_stage: bool = True
    """Within the fast step, the last stage's M meta-gradients and meta forwards as one hand-written pass
    batched over the label sets (ResNet-block backbones; method/last_stage.py); false: autograd per label set."""
    trust: str = "posterior"
    """What trains the weights over the label sets (method aol). posterior (default): an annotator model trained
    jointly with the classifier by the likelihood of the labels; the weights are each set's posterior probability
    of being right about this sample and finding, the target is the posterior of the truth (method/trust.py,
    docs/quality.md). attention: the paper's Eq. 2-5, trained by the outer loss through Eq. 3 (configs/paper.toml)."""
    annotator: str = "auto"
    """trust = posterior: joint (per finding a distribution over the 2^M label patterns given the truth: no
    independence between label sets), independent (Dawid-Skene confusion per set), auto (joint for multi-label
    data with M <= 8, independent otherwise)."""
    trust_input: str = "auto"
    """trust = posterior: what the per-sample head sees: features (the image features), meta (the meta features
    F_m of Eq. 1: costs the meta step), none (one global annotator model), auto (features on multi-class data,
    none on multi-label data: what `aol study` measured best)."""
    monotone: bool = True
    """trust = posterior, multi-label data: every label set says "present" more often when the finding is
    present than when it is absent (by >= 0.1), over the labelling regimes together (within one regime a set
    may be anything); false lets the annotator model fit inverted sets."""
    regimes: int = 2
    """trust = posterior: labelling regimes R. R > 1: each image's labels come from a mixture of R annotator
    models, weighted by a small network on the image (method/trust.py RegimeNet): label sets whose reliability
    depends on the image (which hospital, which scanner, a mark on the film). 1: one global annotator model.
    2 by the study (docs/quality.md, "Labelling regimes")."""
    regime_balance: float = 1.0
    """regimes > 1: weight of KL(the batch's mean regime weights || uniform), which keeps every regime in use
    (method/trust.py regime_balance); 0 lets one regime take every image."""
    gold_weight: float = 0.3
    """trust = posterior with ``data.gold_split``: weight of the hand-labelled studies' -log P(Y | t, x) (a batch
    mean) beside the noisy labels' -log P(Y | x) (a batch mean); 0.3 by the study (docs/quality.md, "Fourth pass")."""
    prior_power: float = 1.0
    """trust = posterior: tau, the power of the prior P(t | x) in the training target's posterior; 1 by the study."""
    trust_lr: float = 5e-2
    """trust = posterior: Adam learning rate of the annotator model and its per-sample head."""
    cm_lambda: float = 0.01
    """Weight of the mean-trace regulariser of the CM baseline (paper 002, Eq. 4)."""
    loss: str = "auto"
    """Loss of the baselines and ceilings: "softmax" (cross-entropy with soft targets over the classes; CM with a
    K x K matrix per label set), "bce" (each finding or class a yes/no: on multi-class shards the paper's one-hot
    BCE, Sec. 3.1; CM 2 x 2 per label set and finding), or "auto": softmax on multi-class shards (manifest
    ``label_kind``), bce otherwise. aol with trust = attention trains with the paper's one-hot BCE."""
    cm_lr: float = 1e-2
    """Adam learning rate of CM's confusion matrices, a parameter group of their own (at the classifier's rate they
    hardly leave the identity; 1e-2 recovers known flip rates within 0.05, tests/test_multiclass.py)."""

    def validate(self) -> None:
        _require(self.name in ("aol", "single", "majority", "soft_average", "cm", "truth", "best_choice"),
                 f"method.name unknown: {self.name!r}")
        _require(self.meta_scope in ("full", "partial"), f"method.meta_scope must be full or partial, got {self.meta_scope!r}")
        _require(self.cm_lambda >= 0, "method.cm_lambda must be >= 0")
        _require(self.loss in ("auto", "softmax", "bce"), f"method.loss must be auto, softmax or bce, got {self.loss!r}")
        _require(self.cm_lr > 0, "method.cm_lr must be > 0")
        _require(not (self.name == "aol" and self.trust == "attention" and self.loss == "softmax"),
                 "method.loss = softmax: the paper's attention (method.trust = attention) trains with its one-hot "
                 "BCE (Sec. 3.1); use method.loss = auto or bce")
        _require(self.combine in ("text", "listing"), f"method.combine must be text or listing, got {self.combine!r}")
        _require(self.attention in ("per_set", "per_finding"), f"method.attention unknown: {self.attention!r}")
        _require(self.trust in ("posterior", "attention"), f"method.trust must be posterior or attention, got {self.trust!r}")
        _require(self.annotator in ("auto", "joint", "independent"),
                 f"method.annotator must be auto, joint or independent, got {self.annotator!r}")
        _require(self.trust_input in ("auto", "features", "meta", "none"),
                 f"method.trust_input must be auto, features, meta or none, got {self.trust_input!r}")
        _require(self.trust_lr > 0, "method.trust_lr must be > 0")
        _require(0 <= self.prior_power <= 2, f"method.prior_power must be 0 to 2, got {self.prior_power}")
        _require(self.gold_weight > 0, f"method.gold_weight must be > 0, got {self.gold_weight}")
        from aol_dist.method.trust import MAX_REGIMES

        _require(1 <= self.regimes <= MAX_REGIMES, f"method.regimes must be 1 to {MAX_REGIMES}, got {self.regimes}")
        _require(self.regime_balance >= 0, f"method.regime_balance must be >= 0, got {self.regime_balance}")
        for key in ("meta_lr", "lr"):
            _require(getattr(self, key) > 0, f"method.{key} must be > 0, got {getattr(self, key)}")
        _require(self.attention_lr >= 0, f"method.attention_lr must be >= 0 (0: the majority vote), got {self.attention_lr}")
        _require(self.k > 0, "method.k must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps (every rank runs exactly this many)."""
    seed: int = 0
    """Seeds model init (identical on every rank) and the data order (seed, epoch)."""
    log_every: int = 10
    """Steps between JSONL log lines."""
    eval_every: int = 0
    """Steps between evaluations during training; 0 = only at the end."""
    eval_batch_size: int = 64
    """Samples per rank per evaluation batch."""
    out_dir: str = "runs"
    """Parent of run directories."""
    run_name: str = ""
    """Run directory name; empty = ``<method>-<UTC time>``. Set it for ``resume`` (SLURM: the job id)."""
    checkpoint_every: int = 500
    """Steps between checkpoints in ``<run>.incomplete/checkpoints/``; one is also written at the end. 0 = end only."""
    keep_checkpoints: int = 3
    """Checkpoints kept (the newest); older ones are deleted once a newer one is complete."""
    resume: str = ""
    """"" = start a new run; "latest" = continue the run ``run_name`` from its newest checkpoint (error if none);
    "auto" = that if a checkpoint exists, else start (what a requeued SLURM job wants); or a checkpoint
    directory (or a run directory: its newest checkpoint), checked when the run starts."""
    nan_policy: str = "stop"
    """A NaN/inf loss or gradient on any rank: "stop" names the step, rank and sample ids and exits non-zero;
    "skip" drops that step's update on every rank (counted in the log) and goes on."""
    max_skipped_steps: int = 10
    """With nan_policy = "skip": stop after this many consecutive skipped steps (the run has diverged)."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this (a peer rank hung or died) ends the job with an error."""
    precision: str = "auto"
    """Training step arithmetic: "auto" = bf16 autocast on a GPU (float32 master weights, optimizer and
    attention update in float32), float32 on the CPU; "fp32"; "bf16" (autocast on any device)."""
    grad_compression: str = "none"
    """How the ranks send the outer and attention gradients to each other (DDP communication hooks):
    "none" (the parameters' precision), "bf16" or "fp16" (half the bytes; the averaged gradients are rounded
    to that precision). No effect on one process; refused under DeepSpeed launch configs."""
    ddp_fixed_buckets: bool = False
    """Keep DDP's first gradient-bucket layout for the whole run (``find_unused_parameters``: no rebuild after
    the first step): a resumed run then equals the uninterrupted one bit for bit at any number of ranks (off:
    at 1-2 ranks; from 3 on the runs part by float rounding, docs/distributed.md). Costs a walk of the
    autograd graph every step, and PyTorch warns once per rank that no unused parameter was found."""
    tensorboard: bool = False
    """Also write the logged scalars to ``<run>/tensorboard`` (needs the ``tensorboard`` package)."""
    plots: bool = True
    """Write PNG plots at the end: training curves, attention per label set over time, ROC per finding."""
    debug_fault: str = ""
    """Testing only: inject a fault, ``KIND:RANK:STEP`` with KIND nan (the rank's batch becomes NaN), exit
    (the rank exits mid-step), hang (the rank stops mid-step) or kill (the rank SIGKILLs itself mid-step)."""

    def validate(self) -> None:
        _require(self.steps >= 1, "train.steps must be >= 1")
        _require(self.log_every >= 1, "train.log_every must be >= 1")
        _require(self.eval_every >= 0, "train.eval_every must be >= 0")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _require(self.resume not in ("latest", "auto") or bool(self.run_name),
                 f"train.resume = {self.resume!r} needs train.run_name (the run to continue)")
        _require(self.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        from aol_dist.dist import GRAD_COMPRESSION

        _require(self.grad_compression in GRAD_COMPRESSION,
                 f"train.grad_compression must be one of {', '.join(GRAD_COMPRESSION)}, got {self.grad_compression!r}")
        _require(self.nan_policy in ("skip", "stop"), f"train.nan_policy must be skip or stop, got {self.nan_policy!r}")
        _require(self.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1")
        _require(self.collective_timeout_s > 0, "train.collective_timeout_s must be > 0")
        if self.debug_fault:
            from aol_dist.faults import parse_fault

            try:
                parse_fault(self.debug_fault)
            except ValueError as e:
                raise ConfigError(f"train.debug_fault: {e}") from None


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        for f in fields(self):
            getattr(self, f.name).validate()
        _require(not self.data.gold_split or (self.method.name == "aol" and self.method.trust == "posterior"),
                 f"data.gold_split fits the annotator model of method aol with trust = posterior; this run is "
                 f"method.name = {self.method.name!r}, trust = {self.method.trust!r} (unset data.gold_split)")
        if self.data.label_sets:  # M known here; else parts.build_parts checks against the shards' label sets
            check_listing_threshold(self.method, len(self.data.label_sets))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(UserError, ValueError):
    """A config file or override refused on load; the message names the key."""


def check_listing_threshold(method: MethodConfig, num_label_sets: int) -> None:
    """Refuse ``combine = listing`` with a threshold it cannot reach: the mean over m gives
    y_bar = mean_m w_m y_m <= 1/M, so with T >= 1/M every binarized target of Eq. 3 is about 0."""
    if method.name != "aol" or method.trust != "attention":  # combine and threshold belong to the paper's attention
        return
    if method.combine == "listing" and num_label_sets and method.threshold >= 1.0 / num_label_sets:
        raise ConfigError(f"method.combine = listing with method.threshold = {method.threshold:g} and M = "
                          f"{num_label_sets} label sets: the listing's mean over m gives y_bar <= 1/M = "
                          f"{1.0 / num_label_sets:.3g}, so every binarized target is about 0; set method.threshold "
                          f"below 1/M (Listing 1 uses 0.1) or method.combine = text")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML value or a command-line string to the field's declared type."""
    origin = get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, _) = get_args(typ)
        return tuple(_coerce(v, inner, where) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {typ.__name__}") from None


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a table")
            kwargs[name] = _build(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{where}{name}")
    return cls(**kwargs)


def split_override(item: str) -> tuple[str, str]:
    """``"train.steps = 10"`` -> ``("train.steps", "10")``: the one reading of a command-line override."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected section.key=value")
    return key.strip(), value.strip()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "method.k=25"]`` -> nested dict of strings."""
    tree: dict[str, Any] = {}
    for key, value in map(split_override, overrides):
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a TOML config (or the defaults), apply ``section.key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    values = _merge(values, parse_overrides(list(overrides)))
    return _build(Config, values, "").validate()


WRITTEN_BEFORE = {("method", "regimes"): 1, ("data", "gold_split"): "", ("data", "gold_samples"): 0,
                  ("method", "gold_weight"): 0.3, ("train", "ddp_fixed_buckets"): False}  # without a gold split it has no effect
"""Keys a run's written config.toml lacks when it predates them, and the value the run trained with."""


def load_run_config(path: str | Path) -> Config:
    """A finished run's written config.toml (``aol eval``, ``aol audit``): a key added since the run was
    written takes the value the run trained with (:data:`WRITTEN_BEFORE`), not today's default."""
    try:
        values = tomllib.loads(Path(path).read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        values = {}  # load_config names the fault
    missing = [f"{section}.{key}={value}" for (section, key), value in WRITTEN_BEFORE.items()
               if key not in values.get(section, {})]
    return load_config(path, missing)


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "").validate()


def to_toml(config: Config, revision: str) -> str:
    return f"# git revision: {revision}\n" + tomli_w.dumps(config.to_dict())
