"""`aol bench step --json` prints the five timings and the memory with and without checkpointing."""

import json
import subprocess
import sys


def test_bench_step_json_on_a_tiny_config():
    proc = subprocess.run([sys.executable, "-m", "aol_dist.cli", "bench", "step", "--json", "--arch", "resnet_tiny",
                           "--size", "16", "--batch", "4", "--repeats", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("plain_s", "reference_s", "fast_s", "fast_autograd_s", "partial_s"):
        assert result[key] > 0
    assert result["plain_ratio"] == 1.0
    # checkpointing keeps only stage inputs for backward
    assert result["activation_bytes_reference_checkpointed"] < result["activation_bytes_reference"]
    assert result["activation_bytes_fast_checkpointed"] < result["activation_bytes_fast"]
