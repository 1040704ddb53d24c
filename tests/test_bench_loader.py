"""`aol bench loader` prints its JSON figure; the fast tar / npy readers agree with tarfile / numpy and
are strict about truncation."""

import io
import json
import tarfile

import numpy as np
import pytest

from aol_dist.cli import main as cli
from aol_dist.data.tario import TarFormatError, decode_npy, iter_members


def test_bench_loader_json(capsys):
    code = cli(["bench", "loader", "--json", "--images", "96", "--image-size", "32", "--samples-per-shard", "32",
                "--batch-size", "8", "--gpu-images-per-s", "500"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["images_per_s_per_core"] > 0
    assert result["images"] == 96 and result["image_shape"] == [1, 32, 32]
    assert result["gpu_images_per_s"] == 500 and result["gpu_rate_is_estimate"] is False


def test_bench_loader_text_names_the_estimate(capsys):
    assert cli(["bench", "loader", "--images", "32", "--image-size", "16", "--image-format", "jpg"]) == 0
    assert "ESTIMATE" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_reader_matches_tarfile(tmp_path, fmt):
    path = tmp_path / "x.tar"
    files = {"a.txt": b"hello", "d" * 60 + "/" + "long" * 20 + ".npy": b"\x00" * 700, "b.png": bytes(range(256)) * 3}
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir("somedir"))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime forces PAX headers in PAX format
            tar.addfile(info, io.BytesIO(data))
    assert dict(iter_members(path)) == files


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_fast_reader_is_strict_about_truncation(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for k in range(3):
            info = tarfile.TarInfo(f"s{k}.txt")
            info.size = 600
            tar.addfile(info, io.BytesIO(b"x" * 600))
    data = path.read_bytes()
    for cut, message in ((3 * 1536, "without the end-of-archive block"), (1536 + 700, "needs 600 bytes"),
                         (100, "without the end-of-archive")):
        path.write_bytes(data[:cut])
        with pytest.raises(TarFormatError, match=message):
            list(iter_members(path))
    path.write_bytes(b"garbage" * 200)
    with pytest.raises(TarFormatError, match="checksum|octal"):
        list(iter_members(path))


@pytest.mark.parametrize("a", [np.arange(12, dtype=np.int32).reshape(3, 4), np.zeros((0, 14), np.uint8),
                               np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array(7, dtype=np.int64)])
def test_fast_npy_decode_matches_numpy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    got = decode_npy(buf.getvalue())
    assert got.dtype == a.dtype and got.shape == a.shape and (got == a).all() and got.flags.writeable
