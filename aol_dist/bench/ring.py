"""The cost model behind ``aol bench scaling``'s projection: a ring all-reduce of the gradient bytes at
stated link bandwidths and latencies, and the weak-scaling efficiency it leaves (docs/distributed.md).

Everything here is arithmetic on stated assumptions (:data:`LINKS`, the GPU step time); nothing is
measured. The model:

- one ring all-reduce of ``b`` bytes over ``n`` ranks: ``t = 2 (n-1)/n * b / bandwidth + 2 (n-1) * latency``
  (a reduce-scatter and an all-gather, each ``n-1`` steps that move ``b/n`` bytes);
- up to one node (``gpus_per_node`` GPUs): one ring over NVLink;
- several nodes: hierarchical, as NCCL does it in effect: a reduce-scatter and an all-gather inside each
  node over NVLink (together the cost of a ring all-reduce of ``b`` over the node's GPUs), and between
  them every GPU all-reduces its ``b / gpus_per_node`` shard in a ring over the nodes, the node's
  GPUs sharing its ``nics_per_node`` network links (each GPU gets ``bandwidth * nics / gpus_per_node``);
- DDP sends the bytes in ``buckets`` all-reduces: the bandwidth term is the same, the latency term is
  paid once per bucket;
- without overlap the all-reduce follows the backward pass; with DDP's overlap it runs during the
  backward pass (``backward_s``), but the last bucket can start only when the backward has ended, so at
  least one bucket's all-reduce is exposed;
- the batch-norm statistics' all-reduce (``dist.average_statistics``) follows the backward in both cases;
- weak scaling: every GPU keeps its batch, so efficiency = GPU step time / (GPU step time + exposed
  communication), the throughput per GPU relative to one GPU without communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Link:
    label: str
    bandwidth: float
    """bytes/s in one direction, per link (line rate: what NCCL reaches is lower, so the projection is a
    best case)"""
    latency: float
    """seconds per ring step"""


NVLINK = Link("NVLink 4 (H100 SXM), 450 GB/s per direction, 2 us", 450e9, 2e-6)
LINKS: dict[str, Link] = {
    "nvlink": NVLINK,
    "ib400": Link("InfiniBand NDR 400 Gb/s, 5 us", 400e9 / 8, 5e-6),
    "ib200": Link("InfiniBand HDR 200 Gb/s, 5 us", 200e9 / 8, 5e-6),
    "eth100": Link("Ethernet 100 Gb/s (RoCE), 15 us", 100e9 / 8, 15e-6),
}
"""Between nodes: the named link; within a node always :data:`NVLINK`. ``nvlink`` alone: one node only."""

DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's default ``bucket_cap_mb`` (25 MiB)."""


def ring_allreduce_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for one ring all-reduce of ``nbytes`` over ``n`` ranks: 2 (n-1)/n b/bw + 2 (n-1) lat."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def allreduce_s(nbytes: float, gpus: int, link: Link, gpus_per_node: int = 8, nics_per_node: int = 1,
                buckets: int = 1) -> float:
    """Seconds to all-reduce ``nbytes`` over ``gpus`` GPUs in ``buckets`` equal all-reduces (module docstring)."""
    part = nbytes / buckets
    if gpus <= gpus_per_node:
        return buckets * ring_allreduce_s(part, gpus, NVLINK.bandwidth, NVLINK.latency)
    if gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs is not a whole number of nodes of {gpus_per_node}")
    intra = ring_allreduce_s(part, gpus_per_node, NVLINK.bandwidth, NVLINK.latency)
    inter = ring_allreduce_s(part / gpus_per_node, gpus // gpus_per_node,
                             link.bandwidth * nics_per_node / gpus_per_node, link.latency)
    return buckets * (intra + inter)


def ddp_buckets(nbytes: float, bucket_bytes: int = DDP_BUCKET_BYTES) -> int:
    return max(1, math.ceil(nbytes / bucket_bytes))


def project(grad_bytes: int, stats_bytes: int, gpu_step_s: float, backward_s: float, batch: int,
            gpus: list[int], links: dict[str, Link] = LINKS, gpus_per_node: int = 8,
            nics_per_node: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """``{link: {gpus: {efficiency, overlap_efficiency, ...}}}`` for weak scaling at ``batch`` per GPU.

    ``nvlink`` is projected only up to one node; the other links carry the traffic between nodes.
    """
    buckets = ddp_buckets(grad_bytes)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, link in links.items():
        rows = {}
        for n in gpus:
            if link is NVLINK and n > gpus_per_node:
                continue
            grads = allreduce_s(grad_bytes, n, link, gpus_per_node, nics_per_node, buckets)
            stats = allreduce_s(stats_bytes, n, link, gpus_per_node, nics_per_node, 1) if stats_bytes else 0.0
            exposed = max(grads / buckets, grads - backward_s) if grads else 0.0
            step, overlap_step = gpu_step_s + grads + stats, gpu_step_s + exposed + stats
            rows[str(n)] = {"efficiency": gpu_step_s / step, "overlap_efficiency": gpu_step_s / overlap_step,
                            "allreduce_s": grads, "exposed_allreduce_s": exposed, "stats_allreduce_s": stats,
                            "images_per_s": n * batch / step, "overlap_images_per_s": n * batch / overlap_step}
        out[name] = rows
    return out


def assumptions(links: dict[str, Link] = LINKS, gpus_per_node: int = 8, nics_per_node: int = 1) -> dict[str, Any]:
    """The stated assumptions, for the JSON output."""
    return {"links": {k: {"label": v.label, "bandwidth_bytes_per_s": v.bandwidth, "latency_s": v.latency}
                      for k, v in links.items()},
            "gpus_per_node": gpus_per_node, "nics_per_node": nics_per_node, "ddp_bucket_bytes": DDP_BUCKET_BYTES}
