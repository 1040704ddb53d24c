"""``aol bench loader``: images/s per CPU core from shards through decode and collate (SPEC 7).

One process, one thread, the training reader's own path (:class:`aol_dist.data.stream.TrainStream`:
tar parsing, shuffle buffer, image and label decoding, collate into uint8 batches), timed over one
epoch after a short warm-up. The per-core figure divides by the process's CPU time, so it does not
depend on what else the machine runs; the wall-clock rate is reported beside it.

Without ``--shards`` it writes temporary shards first (not timed): grey images of the built-in
synthetic dataset at ``--image-size``, drawn from a pool of distinct studies (its noisy texture
compresses worse than real radiographs, so the figure is on the pessimistic side).

Next to it: the rate one GPU consumes images at, to size ``data.num_workers``: cores needed per GPU =
GPU rate / per-core rate. :data:`GPU_IMAGES_PER_S_ESTIMATE` is an ESTIMATE, not a measurement; pass
``--gpu-images-per-s`` with a measured figure (batch / ``fast_s`` of ``aol bench step --json`` on
the GPU, at the same model, image size and batch) to replace it.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

#: Images/s one A100-class GPU consumes in the attention-on-label step, ResNet-50, 256 x 256, batch 32,
#: M = 4, bf16 -- an ESTIMATE: a plain ResNet-50 training step runs at about 2,000 images/s at this
#: size, and the meta step costs about five plain steps (one forward, M meta-gradients, M meta
#: forwards, one outer backward). The plain single-label-set baseline consumes about 2,000 images/s.
GPU_IMAGES_PER_S_ESTIMATE = 400.0
POOL = 64  # distinct synthetic studies the benchmark shards are drawn from


def _pool_sample(index: int, size: int, image_format: str) -> dict[str, Any]:
    sample = dict(_pool(size)[index % POOL])
    sample["key"] = f"bench-{index:08d}"
    sample["image_format"] = image_format
    return sample


@functools.lru_cache(maxsize=2)
def _pool(size: int) -> tuple[dict[str, Any], ...]:
    from aol_dist.data.build import synth_sample

    return tuple(synth_sample(i, 0, size) for i in range(POOL))


def build_bench_shards(out: str | Path, images: int, image_size: int, image_format: str = "png",
                       samples_per_shard: int = 256) -> Path:
    """Temporary benchmark shards: ``images`` samples of the synthetic dataset in the real shard format."""
    from aol_dist.data import shards
    from aol_dist.data.findings import FINDINGS, LABEL_SETS

    make = functools.partial(_pool_sample, size=image_size, image_format=image_format)
    records, _ = shards.write_split(out, shards.plan_jobs("train", list(range(images)), samples_per_shard), make)
    shards.write_manifest(out, dataset="bench", findings=FINDINGS, label_sets=LABEL_SETS, splits={"train": records},
                          image_size=image_size, has_truth={"train": True}, image_format=image_format)
    return Path(out)


def measure(shard_dir: str | Path, split: str = "train", batch_size: int = 32, shuffle_buffer: int = 512,
            warmup_batches: int = 2) -> dict[str, Any]:
    """Read one epoch of ``split`` in this process; images/s per CPU second and per wall second."""
    import torch

    from aol_dist.data.shards import label_shape, read_manifest, split_shards
    from aol_dist.data.stream import TrainStream

    torch.set_num_threads(1)  # one core: the figure is per core
    manifest = read_manifest(shard_dir)
    stream = TrainStream(split_shards(shard_dir, manifest, split), rank=0, world_size=1, batch_size=batch_size,
                         shuffle_buffer=shuffle_buffer, label_shape=label_shape(manifest))
    for i, _ in enumerate(stream.iter_worker(0, 1)):  # warm-up: file cache, lazy imports, allocator
        if i + 1 >= warmup_batches:
            break
    stream.set_epoch(1)
    images = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in stream.iter_worker(0, 1):
        images += batch["image"].shape[0]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    shape = tuple(batch["image"].shape[1:])
    return {"images_per_s_per_core": images / max(cpu, 1e-9), "wall_images_per_s": images / max(wall, 1e-9),
            "images": images, "cpu_s": cpu, "wall_s": wall, "batch_size": batch_size, "image_shape": list(shape),
            "image_format": manifest.get("image_format", "png"), "dataset": manifest["dataset"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.shards:
        result = measure(args.shards, args.split, args.batch_size, args.shuffle_buffer)
        result["shards"] = str(args.shards)
    else:
        with tempfile.TemporaryDirectory(prefix="aol-bench-loader-") as tmp:
            build_bench_shards(tmp, args.images, args.image_size, args.image_format, args.samples_per_shard)
            result = measure(tmp, "train", args.batch_size, args.shuffle_buffer)
        result["shards"] = "synthetic (temporary)"
    gpu = args.gpu_images_per_s or GPU_IMAGES_PER_S_ESTIMATE
    result.update(gpu_images_per_s=gpu, gpu_rate_is_estimate=not args.gpu_images_per_s,
                  cores_per_gpu=gpu / result["images_per_s_per_core"])
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", help="shard directory to read (default: temporary synthetic shards)")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=4096, help="images in the temporary shards")
    p.add_argument("--image-size", type=int, default=256, help="side of the temporary shards' grey images")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png", help="of the temporary shards")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shuffle-buffer", type=int, default=512)
    p.add_argument("--gpu-images-per-s", type=float, default=0.0,
                   help=f"measured images/s one GPU consumes (default: the estimate {GPU_IMAGES_PER_S_ESTIMATE:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    shape = "x".join(str(s) for s in result["image_shape"])
    print(f"loader: {result['images_per_s_per_core']:.0f} images/s per CPU core ({result['wall_images_per_s']:.0f}/s "
          f"wall) reading {result['images']} {result['image_format']} images {shape} from {result['shards']}, "
          f"batch {result['batch_size']}")
    kind = "ESTIMATE (pass --gpu-images-per-s to use a measured rate)" if result["gpu_rate_is_estimate"] else "measured"
    print(f"GPU consumes {result['gpu_images_per_s']:.0f} images/s [{kind}]: "
          f"{result['cores_per_gpu']:.2f} loader cores per GPU keep it fed (data.num_workers per rank)")
    return 0
