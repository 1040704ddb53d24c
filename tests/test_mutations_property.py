"""Property-based mutation suite (Hypothesis): any damage to a shard's bytes or members is either caught,
naming the shard, or harmless, where it is read.

From a small valid shard directory, each example applies one mutation to one shard: a flipped byte, a
truncation, a deleted or renamed member, or a member copied to the end. Then:
- ``verify`` raises a ShardError naming the shard (it checks every shard's sha256 first);
- the training and evaluation readers, which do not hash, either raise an error naming the shard (and,
  where it is one sample's content, the sample) or yield exactly the original samples: a byte in the
  tar's padding changes nothing read. No other exception type reaches the user, and nothing passes
  silently changed.
"""

import io
import shutil
import tarfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from aol_dist.data.shards import ShardError, label_shape, read_manifest, split_shards, verify  # noqa: E402
from aol_dist.data.stream import EvalStream, TrainStream  # noqa: E402
from helpers import write_fake_shards  # noqa: E402

SHARDS = ("train-000000.tar", "train-000001.tar")
KINDS = ("flip", "truncate", "delete", "rename", "duplicate")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    write_fake_shards(root, {"train": [5, 4]})
    return root, _read_all(root)


def _read_all(root):
    """Every sample as the evaluation reader and the training reader's worker see it (keys, labels, truth,
    pixels), in file order."""
    manifest = read_manifest(root)
    shards = split_shards(root, manifest, "train")
    out = []
    for batch in EvalStream(shards, 0, 1, batch_size=3, label_shape=label_shape(manifest)):
        out += [(k, batch["labels"][i].tolist(), batch["truth"][i].tolist(), batch["image"][i].numpy().tobytes())
                for i, k in enumerate(batch["key"])]
    train = TrainStream(shards, 0, 1, batch_size=3, shuffle_buffer=1, label_shape=label_shape(manifest))
    train.set_epoch(0)
    seen = sorted(k for batch in train.iter_worker(0, 1) for k in batch["key"])
    return out, seen


def _members(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(path, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def mutate(path, kind, where):
    """Apply ``kind`` to the shard at ``path``; ``where`` in [0, 1) picks the byte or the member."""
    data = bytearray(path.read_bytes())
    if kind == "flip":
        i = int(where * len(data))
        data[i] ^= 0x5A
        path.write_bytes(bytes(data))
        return
    if kind == "truncate":
        path.write_bytes(bytes(data[:int(where * len(data))]))
        return
    members = _members(path)
    j = int(where * len(members))
    info, payload = members[j]
    if kind == "delete":
        del members[j]
    elif kind == "rename":
        key, _, suffix = info.name.partition(".")
        info.name = f"{key}.x{suffix}"
    elif kind == "duplicate":  # a copy at the end: a stray piece of a sample after the others
        members.append((info, payload))
    _rewrite(path, members)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), shard=st.sampled_from(SHARDS), where=st.floats(0, 1, exclude_max=True))
def test_damage_is_named_or_harmless(pristine, tmp_path_factory, kind, shard, where):
    root, original = pristine
    work = tmp_path_factory.mktemp("mutated")
    shutil.copytree(root, work, dirs_exist_ok=True)
    mutate(work / shard, kind, where)
    if (work / shard).read_bytes() != (root / shard).read_bytes():
        with pytest.raises(ShardError, match=shard):
            verify(work)
    try:
        read = _read_all(work)
    except (ShardError, ValueError) as e:  # ValueError: decode_sample names the shard and the sample
        assert shard in str(e), f"{kind} at {where:.3f}: the error does not name {shard}: {e}"
        return
    assert read == original, f"{kind} at {where:.3f} of {shard} passed the readers with changed samples"


def test_the_mutations_reach_every_kind_of_damage(pristine, tmp_path):
    """The strategy's cases are real damage: each kind, applied to the middle of a shard, is caught."""
    root, _ = pristine
    for kind in KINDS:
        work = tmp_path / kind
        shutil.copytree(root, work)
        mutate(work / SHARDS[0], kind, 0.5)
        with pytest.raises((ShardError, ValueError), match=SHARDS[0]):
            _read_all(work)
