"""WebDataset tar shards and their manifest: writing (parallel, resumable, atomic) and verify (inspect: label_stats.py).

One sample = one frontal image (8-bit grey or RGB, PNG or JPEG, resized once at conversion), the M
label vectors as one ``(M, N)`` uint8 array (names in the manifest; M may be 0 for an evaluation-only
split), an optional ``truth`` vector, report text and token ids (optional), and the study ids.
Files inside a sample:

    <key>.png|jpg  <key>.labels.npy  [<key>.truth.npy]  [<key>.tokens.npy]  <key>.txt  <key>.ids.json

Layout of a shard directory::

    DIR/manifest.json                 splits -> shards -> sample counts and sha256
    DIR/<split>-000000.tar            finished shard (only ever appears by rename)
    DIR/<split>-000000.tar.json       its record: samples, sha256, skipped samples, what made it
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from aol_dist.data.images import IMAGE_FORMATS, decode_image, encode_image, image_entry  # noqa: F401 (re-exported)
from aol_dist.data.tario import TarFormatError, decode_npy, iter_members
from aol_dist.errors import UserError
from aol_dist.writes import atomic_write_text, sha256_file, writing

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: ``multilabel``: N findings, each a yes/no. ``multiclass``: the findings are K classes, every label set one-hot.
LABEL_KINDS = ("multilabel", "multiclass")


class ShardError(UserError, RuntimeError):
    """A shard or manifest that does not match what was written; the message names the file."""


# --------------------------------------------------------------------------- encoding


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: dict[str, Any]) -> dict[str, bytes]:
    """Canonical sample dict -> the files of one tar sample (suffix -> bytes); ``sample["image_format"]``
    (default ``"png"``) picks the image entry: ``png`` or ``jpg``."""
    image_format = sample.get("image_format", "png")
    files = {
        image_format: encode_image(sample["image"], image_format, sample["key"]),
        "labels.npy": _npy_bytes(np.asarray(sample["labels"], dtype=np.uint8)),
        "txt": sample.get("report", "").encode("utf-8"),
        "ids.json": json.dumps(sample.get("ids", {}), sort_keys=True).encode("utf-8"),
    }
    if sample.get("truth") is not None:
        files["truth.npy"] = _npy_bytes(np.asarray(sample["truth"], dtype=np.uint8))
    if sample.get("tokens") is not None:
        files["tokens.npy"] = _npy_bytes(np.asarray(sample["tokens"], dtype=np.int32))
    return files


def decode_array(data: bytes) -> np.ndarray:
    return decode_npy(data)


# --------------------------------------------------------------------------- reading


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Raw samples of one shard in file order: ``{"__key__": key, suffix: bytes, ...}``.

    A truncated or corrupt tar raises :class:`ShardError` naming the shard.
    """
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        for name, data in iter_members(path):  # a fast strict ustar reader: tarfile was the loader's bottleneck
            key, _, suffix = name.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[suffix] = data
    except (TarFormatError, OSError) as e:
        raise ShardError(f"{path}: unreadable or truncated tar shard ({e})") from None
    if current is not None:
        yield current


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest; build shards with `aol shards synth|mimic|... --out {shard_dir}`") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
    return manifest


def label_shape(manifest: dict[str, Any]) -> tuple[int, int]:
    """(M, N): the shape of every sample's label array (label sets x findings)."""
    return len(manifest["label_sets"]), len(manifest["findings"])


def check_labels(labels: np.ndarray, truth: np.ndarray | None, shape: tuple[int, int] | None, where: str) -> None:
    """A sample's label array must be ``shape`` (M, N) and its truth (N,), every value 0 or 1; else
    :class:`ShardError` naming ``where`` (shard and sample). ``shape`` None: the values, and the truth's
    length against the labels', only."""
    m, n = shape if shape is not None else (labels.shape[0], labels.shape[-1])
    if labels.shape != (m, n):
        raise ShardError(f"{where}: labels shape {labels.shape}, manifest says ({m}, {n})")
    if truth is not None and truth.shape != (n,):
        raise ShardError(f"{where}: truth shape {truth.shape}, manifest says ({n},)")
    for name, a in (("label", labels), ("truth", truth)):
        if a is not None and a.size and ((a != 0) & (a != 1)).any():
            bad = sorted({v.item() for v in a[(a != 0) & (a != 1)]})
            raise ShardError(f"{where}: {name} values {bad[:5]} outside {{0, 1}}")


def check_count(path: Path, seen: int, listed: int) -> None:
    """A shard read whole must hold the samples the manifest lists for it."""
    if seen != listed:
        raise ShardError(f"{path}: {seen} samples, manifest says {listed}: the shard or manifest.json changed "
                         f"after conversion (`aol shards verify` checks every shard)")


def split_shards(shard_dir: str | Path, manifest: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    """``[(path, samples), ...]`` of one split, in manifest order."""
    if split not in manifest["splits"]:
        raise ShardError(f"{Path(shard_dir) / MANIFEST}: no split {split!r}; has {sorted(manifest['splits'])}")
    return [(Path(shard_dir) / s["name"], int(s["samples"])) for s in manifest["splits"][split]["shards"]]


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its file name and the source items it holds (indices, paths, ...)."""

    name: str
    items: tuple[Any, ...]


def made_with(job: ShardJob, make_sample: Callable[[Any], Any]) -> dict[str, str]:
    """What a shard is made from, as text its record keeps: the sample maker, the settings bound to it
    (``functools.partial``: image size, format, root, ...) and a digest of the job's items. A finished shard
    is reused only by a conversion that would write it again the same way."""
    func, args, keywords = make_sample, (), {}
    while isinstance(func, functools.partial):
        args, keywords, func = func.args + args, {**func.keywords, **keywords}, func.func
    return {"maker": f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}",
            **{f"arg{i}": repr(a) for i, a in enumerate(args)}, **{k: repr(v) for k, v in sorted(keywords.items())},
            "items_sha256": hashlib.sha256(repr(job.items).encode()).hexdigest()}


def write_shard(out_dir: Path, job: ShardJob, make_sample: Callable[[Any], dict[str, Any] | None]) -> dict[str, Any]:
    """Write one shard to a temporary name and rename it; return its record.

    ``make_sample(item)`` returns a canonical sample dict, or raises ``SkipSample`` for a sample
    that is safe to skip (counted with its reason in the record).
    """
    import webdataset as wds

    final = out_dir / job.name
    tmp = out_dir / f".{job.name}.tmp{os.getpid()}"
    skipped: list[dict[str, str]] = []
    notes: list[dict[str, str]] = []  # kept samples with something to report (e.g. no report text)
    count = 0
    with writing(final, tmp), open(tmp, "wb") as stream:
        # mtime fixed so a re-run writes byte-identical shards (resume == uninterrupted); an int, as a
        # float mtime costs every member an extra PAX header (twice the headers for the reader to parse).
        with wds.TarWriter(stream, encoder=False, mtime=0) as sink:
            for item in job.items:
                try:
                    sample = make_sample(item)
                except SkipSample as e:
                    skipped.append({"item": str(item), "reason": str(e)})
                    continue
                files = encode_sample(sample)
                sink.write({"__key__": sample["key"], **files})
                notes.extend({"key": sample["key"], "note": n} for n in sample.get("notes", ()))
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, final)
    record = {"name": job.name, "samples": count, "sha256": sha256_file(final), "skipped": skipped, "notes": notes,
              "made_with": made_with(job, make_sample)}
    # The record is written after the shard: a shard without a record is redone on resume.
    atomic_write_text(out_dir / f"{job.name}.json", json.dumps(record))
    return record


class SkipSample(Exception):
    """Raised by a sample maker for an input that is safe to skip; the reason is reported."""


def _finished_record(out_dir: Path, job: ShardJob, make_sample: Callable[[Any], Any]) -> dict[str, Any] | None:
    """The record of ``job``'s shard where a finished one is there (None: write it). A shard another
    conversion made (other settings or items) is refused, not reused; records from before ``made_with`` are
    reused as they were."""
    record_path = out_dir / f"{job.name}.json"
    if not (record_path.is_file() and (out_dir / job.name).is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    before, now = record.get("made_with"), made_with(job, make_sample)
    if before is not None and before != now:
        differ = [f"{k}: {before.get(k, '-')} -> {now.get(k, '-')}" if k != "items_sha256" else
                  "the samples it holds (other source files, split or --samples-per-shard)"
                  for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
        raise ShardError(f"{out_dir / job.name}: a finished shard that another conversion wrote ({'; '.join(differ)}); "
                         f"convert into another directory, or delete {out_dir}/{job.name.rsplit('-', 1)[0]}-* to "
                         f"rewrite that split")
    return record


def write_split(out_dir: str | Path, jobs: Sequence[ShardJob], make_sample: Callable[[Any], dict[str, Any]],
                workers: int = 1) -> tuple[list[dict[str, Any]], int]:
    """Write every shard of a split, skipping shards already finished (resumable); parallel over shards.

    Returns the shard records in job order and how many shards were already there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        done = _finished_record(out_dir, job, make_sample)
        if done is not None:
            records[job.name] = done
        else:
            todo.append(job)
    reused = len(records)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_shard, out_dir, job, make_sample) for job in todo]
            for job, fut in zip(todo, futures):
                records[job.name] = fut.result()
    else:
        for job in todo:
            records[job.name] = write_shard(out_dir, job, make_sample)
    for job in jobs:  # temporary files (shard or record) of writers killed in an earlier run: now finished
        for pattern in (f".{job.name}.tmp*", f".{job.name}.json.tmp*"):
            for stale in out_dir.glob(pattern):
                stale.unlink(missing_ok=True)
    return [records[j.name] for j in jobs], reused


def write_manifest(out_dir: str | Path, *, dataset: str, findings: Sequence[str], label_sets: Sequence[str],
                   splits: dict[str, list[dict[str, Any]]], image_size: int, tokenizer: dict[str, Any] | None = None,
                   source: dict[str, Any] | None = None, has_truth: dict[str, bool] | None = None,
                   channels: int = 1, image_format: str = "png", label_kind: str = "multilabel") -> dict[str, Any]:
    """Write ``DIR/manifest.json``. ``label_kind``: ``multilabel`` (each finding a yes/no) or ``multiclass``
    (the findings are K classes; every label set and truth vector is one-hot)."""
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "findings": list(findings),
        "label_sets": list(label_sets),
        "label_kind": label_kind,
        "image_size": image_size,
        "channels": channels,
        "image_format": image_format,
        "tokenizer": tokenizer,
        "source": source or {},
        "splits": {
            name: {
                "samples": sum(r["samples"] for r in records),
                "has_truth": bool((has_truth or {}).get(name, False)),
                "shards": [{k: r[k] for k in ("name", "samples", "sha256")} for r in records],
                "skipped": sum(len(r.get("skipped", [])) for r in records),
            }
            for name, records in splits.items()
        },
    }
    manifest["splits"] = _kept_splits(Path(out_dir) / MANIFEST, manifest) | manifest["splits"]
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


#: What splits of one directory must share (with the defaults of manifests written before the key).
_SHARED = {"findings": None, "label_sets": None, "label_kind": "multilabel", "image_size": None, "channels": 1,
           "image_format": "png", "tokenizer": None}


def check_directory(out_dir: str | Path, splits: Sequence[str], *, findings: Sequence[str], label_sets: Sequence[str],
                    image_size: int, tokenizer: dict[str, Any] | None = None, channels: int = 1,
                    image_format: str = "png", label_kind: str = "multilabel") -> None:
    """Before a conversion writes anything: refuse (:class:`ShardError`) a directory whose other splits were
    converted with other findings, label sets or image settings, as :func:`write_manifest` would after the last
    shard (hours into a MIMIC-CXR conversion)."""
    _kept_splits(Path(out_dir) / MANIFEST, {
        "findings": list(findings), "label_sets": list(label_sets), "label_kind": label_kind, "image_size": image_size,
        "channels": channels, "image_format": image_format, "tokenizer": tokenizer, "splits": dict.fromkeys(splits)})


def _kept_splits(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The splits an existing manifest at ``path`` lists that the new one does not write: kept, so converting
    another split into a directory adds it and never drops one; a directory whose splits were converted with
    other findings, label sets or image settings is refused (:class:`ShardError`), its manifest untouched."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    kept = {k: v for k, v in old.get("splits", {}).items() if k not in manifest["splits"]}
    if not kept:
        return {}
    if "label_kind" not in old:
        old["label_kind"] = label_kind(old)
    differ = [k for k, default in _SHARED.items() if old.get(k, default) != manifest[k]]
    if differ:
        raise ShardError(f"{path}: holds split(s) {', '.join(sorted(kept))} converted with other "
                         f"{', '.join(differ)} ({', '.join(f'{k}={old.get(k, _SHARED[k])!r}' for k in differ)}, "
                         f"this conversion: {', '.join(f'{k}={manifest[k]!r}' for k in differ)}); convert into "
                         f"another directory (the manifest is unchanged)")
    return kept


def label_kind(manifest: dict[str, Any]) -> str:
    """``multiclass`` or ``multilabel``: the manifest's ``label_kind``; for manifests written before that key,
    multiclass where the generic converter recorded ``source.multi_label = false``, else multilabel."""
    kind = manifest.get("label_kind")
    if kind is None:
        return "multiclass" if (manifest.get("source") or {}).get("multi_label") is False else "multilabel"
    if kind not in LABEL_KINDS:
        raise ShardError(f"manifest label_kind {kind!r} not in {LABEL_KINDS}")
    return kind


def plan_jobs(split: str, items: Sequence[Any], samples_per_shard: int) -> list[ShardJob]:
    """Cut ``items`` into consecutive shards of ``samples_per_shard`` named ``<split>-NNNNNN.tar``."""
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    return [ShardJob(f"{split}-{i // samples_per_shard:06d}.tar", tuple(items[i:i + samples_per_shard]))
            for i in range(0, len(items), samples_per_shard)]


# --------------------------------------------------------------------------- verify


def verify(shard_dir: str | Path) -> dict[str, int]:
    """Re-read every shard against the manifest: checksum, sample count, decodability, label, image and
    token shapes, label and truth values in {0, 1}.

    Raises :class:`ShardError` naming the first bad shard; returns samples per split.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    m, n = len(manifest["label_sets"]), len(manifest["findings"])
    size, channels = manifest.get("image_size"), manifest.get("channels", 1)
    image_shape = (size, size) if channels == 1 else (size, size, channels)
    token_len = (manifest.get("tokenizer") or {}).get("max_length")
    counts = {}
    for split, info in manifest["splits"].items():
        total = 0
        for entry in info["shards"]:
            path = shard_dir / entry["name"]
            if not path.is_file():
                raise ShardError(f"{path}: missing (listed in the manifest)")
            if sha256_file(path) != entry["sha256"]:
                raise ShardError(f"{path}: checksum differs from the manifest")
            seen = 0
            for raw in iter_tar_samples(path):
                where = f"{path}: sample {raw['__key__']}"
                try:
                    image = decode_image(image_entry(raw))
                    labels = decode_array(raw["labels.npy"])
                    truth = decode_array(raw["truth.npy"]) if "truth.npy" in raw else None
                    tokens = decode_array(raw["tokens.npy"]) if "tokens.npy" in raw else None
                except Exception as e:  # noqa: BLE001 - any decode failure is a bad shard
                    raise ShardError(f"{where}: cannot decode ({e})") from None
                if size and image.shape != image_shape:
                    raise ShardError(f"{where}: image shape {image.shape}, manifest says {image_shape}")
                if token_len is not None and (tokens is None or tokens.shape != (token_len,) or tokens.dtype != np.int32):
                    got = "none" if tokens is None else f"{tokens.dtype} {tokens.shape}"
                    raise ShardError(f"{where}: token ids {got}, manifest's tokenizer says int32 ({token_len},)")
                check_labels(labels, truth, (m, n), where)
                seen += 1
            check_count(path, seen, entry["samples"])
            total += seen
        counts[split] = total
    return counts
