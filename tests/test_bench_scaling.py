"""`aol bench scaling --json`: the JSON shape, the measured bytes against the trained parameters' bytes
(and DDP's own count), and the ring all-reduce cost model against hand computations."""

import json
import math

import pytest

from aol_dist.bench import ring
from aol_dist.bench.scaling import gradient_bytes, trainer_parts
from aol_dist.cli import main as cli
from aol_dist.dist import World


def test_bench_scaling_json_on_a_tiny_config(capsys):
    assert cli(["bench", "scaling", "--json", "--size", "16", "--batch", "4", "--rounds", "2", "--warmup", "1",
                "--gpus", "8,16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["measured"]) == {"1", "2"}
    _, parts = trainer_parts("resnet_tiny", 4, [], World())
    trained = sum(p.numel() * 4 for m in parts.trained().values() for p in m.parameters())  # float32
    for row in result["measured"].values():
        assert row["step_s"] > 0 and row["allreduce_s"] >= 0
        assert isinstance(row["bytes"], int) and row["bytes"] == trained
    assert result["measured"]["1"]["allreduce_s"] == 0.0
    two = result["measured"]["2"]
    assert two["allreduce_s"] > 0 and two["ddp_bytes"] == trained  # what DDP itself reports reducing
    for key in ("compute_s", "flat_step_s", "exposed_ddp_s", "exposed_flat_s", "stats_allreduce_s"):
        assert isinstance(two[key], float)
    assert set(result["projected"]) == set(ring.LINKS)
    assert set(result["projected"]["nvlink"]) == {"8"}  # NVLink: one node only
    for link in ("ib400", "ib200", "eth100"):
        assert set(result["projected"][link]) == {"8", "16"}
        for row in result["projected"][link].values():
            assert 0 < row["efficiency"] <= row["overlap_efficiency"] <= 1
    _, r50 = trainer_parts("resnet50", 32, [], World())
    assert result["projection"]["bytes"] == gradient_bytes(r50) == 4 * sum(
        p.numel() for m in r50.trained().values() for p in m.parameters())


def test_ring_allreduce_by_hand():
    # 100 MB over 4 ranks at 10 GB/s, 1 us: 2 * 3/4 * 0.01 s + 6 us
    assert ring.ring_allreduce_s(100e6, 4, 10e9, 1e-6) == pytest.approx(0.015 + 6e-6)
    assert ring.ring_allreduce_s(100e6, 1, 10e9, 1e-6) == 0.0
    # one node of 8: the NVLink ring
    assert ring.allreduce_s(100e6, 8, ring.LINKS["eth100"]) == pytest.approx(2 * 7 / 8 * 100e6 / 450e9 + 14 * 2e-6)


def test_hierarchical_allreduce_and_efficiency_by_hand():
    link = ring.Link("test", 10e9, 10e-6)
    nbytes, nvl = 80e6, 2 * 7 / 8 * 40e6 / 450e9 + 14 * 2e-6  # per bucket of 40 MB inside a node
    # 32 GPUs = 4 nodes; per bucket each GPU's 5 MB shard goes round the 4 nodes on 2 links / 8 GPUs = 2.5 GB/s
    inter = 2 * 3 / 4 * 5e6 / 2.5e9 + 6 * 10e-6
    got = ring.allreduce_s(nbytes, 32, link, gpus_per_node=8, nics_per_node=2, buckets=2)
    assert got == pytest.approx(2 * (nvl + inter))
    with pytest.raises(ValueError, match="whole number of nodes"):
        ring.allreduce_s(nbytes, 12, link)
    # efficiency: 0.1 s step, 0.02 s of backward to hide in, 80 MB -> 4 buckets (25 MiB each)
    rows = ring.project(int(nbytes), 0, 0.1, 0.02, 32, [16], {"test": link})["test"]["16"]
    # 16 GPUs = 2 nodes on 1 link each (1.25 GB/s per GPU); 4 buckets of 20 MB, shards of 2.5 MB
    grads = 4 * ((2 * 7 / 8 * 20e6 / 450e9 + 14 * 2e-6) + (2 * 1 / 2 * 2.5e6 / 1.25e9 + 2 * 10e-6))
    assert rows["allreduce_s"] == pytest.approx(grads)
    assert rows["efficiency"] == pytest.approx(0.1 / (0.1 + grads))
    assert rows["overlap_efficiency"] == pytest.approx(0.1 / (0.1 + max(grads / 4, grads - 0.02)))
    assert rows["images_per_s"] == pytest.approx(16 * 32 / (0.1 + grads))
    assert math.isclose(ring.ddp_buckets(80e6), 4)


def test_runs_of_the_scaling_array_feed_the_same_rows(tmp_path):
    from aol_dist.bench.scaling import runs_table

    runs = []
    for gpus, speed in ((1, 100.0), (2, 190.0)):
        run = tmp_path / f"scale-{gpus}gpu-7"
        run.mkdir()
        records = [{"step": s, "samples_per_s": speed, "world_size": gpus} for s in (10, 20, 30)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(str(run))
    table = runs_table(runs[::-1])
    assert list(table) == ["1", "2"]
    assert table["2"]["samples_per_s_per_gpu"] == 95.0 and table["2"]["efficiency"] == pytest.approx(0.95)
    assert table["2"]["run"] == "scale-2gpu-7"


def test_projection_plot_with_runs(tmp_path):
    from aol_dist.plots import scaling_projection

    projected = ring.project(94_000_000, 200_000, 0.0742, 0.0109, 32, [8, 16, 64])
    result = {"projected": projected, "runs": {"8": {"efficiency": 1.0}, "16": {"efficiency": 0.9}},
              "projection": {"arch": "resnet50", "batch_per_gpu": 32, "gpu_step_s": 0.0742,
                             **ring.assumptions()}}
    assert scaling_projection(result, tmp_path / "scaling.png").stat().st_size > 10_000
