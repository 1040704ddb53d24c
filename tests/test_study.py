"""`aol study`: the benchmark builders (tiny sizes, checked shards with the intended properties), the plan,
results.csv, the summary's statistics from a hand-made results.csv, and a tiny grid that is killed and
re-run (finished runs skipped, the same summary)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aol_dist.data.shards import decode_array, decode_image, image_entry, iter_tar_samples, read_manifest, verify
from aol_dist.study import benchmarks as B
from aol_dist.study.grid import METHODS, Method, expand_methods, impossible, is_baseline, plan
from aol_dist.study.runner import append_result, read_results
from aol_dist.study.summary import summarize
from aol_dist.study.synthetic import cue_side

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = B.Scale(image_size=32, train=120, test=80, images=1000, samples_per_shard=50)


def samples(shard_dir, split=None):
    """(labels (M, K), truth (K,), ids, image) of every sample in the shards (of one split)."""
    manifest = read_manifest(shard_dir)
    for name, info in manifest["splits"].items():
        if split in (None, name):
            for entry in info["shards"]:
                for raw in iter_tar_samples(Path(shard_dir) / entry["name"]):
                    yield (decode_array(raw["labels.npy"]), decode_array(raw["truth.npy"]),
                           json.loads(raw["ids.json"]), decode_image(image_entry(raw)))


def test_the_table_names_what_each_benchmark_needs():
    assert set(B.BENCHMARKS) == {"synth-cxr", "cifar10-paper", "cifar10h", "one-clean", "instance"}
    for bench in B.BENCHMARKS.values():
        assert bench.metric in ("auroc", "accuracy") and bench.builder in ("synth", "one_clean", "instance", "generic")
        assert set(bench.files) <= set(bench.options), bench.name
    assert B.BENCHMARKS["cifar10-paper"].metric == B.BENCHMARKS["cifar10h"].metric == "accuracy"


def test_one_clean_has_exactly_one_set_equal_to_the_truth(tmp_path):
    manifest = B.build_benchmark("one-clean", tmp_path, TINY)
    assert verify(tmp_path) == {"train": 120, "test": 80}
    names = manifest["label_sets"]
    assert names == ["noisy1", "noisy2", "clean", "noisy3"]
    labels, truth = zip(*[(s[0], s[1]) for s in samples(tmp_path)])
    labels, truth = np.stack(labels), np.stack(truth)
    assert (labels[:, names.index("clean")] == truth).all()
    for i, name in enumerate(names):
        if name != "clean":
            assert abs((labels[:, i] != truth).mean() - 0.4) < 0.03, name  # 2,800 entries, flip 40 %


def test_instance_sets_are_right_on_complementary_images_and_neither_is_better(tmp_path):
    B.build_benchmark("instance", tmp_path, B.Scale(image_size=32, train=300, test=100, samples_per_shard=100))
    assert verify(tmp_path) == {"train": 300, "test": 100}
    assert read_manifest(tmp_path)["label_sets"] == ["A", "B"]
    side, cues, errors = cue_side(32), [], {"A": [], "B": []}
    for labels, truth, ids, image in samples(tmp_path):
        cue = bool(ids["cue"])
        assert cue == bool((image[:side, :side] == 255).all())  # the cue is visible in the image
        right, wrong = (0, 1) if cue else (1, 0)
        assert (labels[right] == truth).all()
        errors["B" if cue else "A"].append((labels[wrong] != truth).mean())
        cues.append(cue)
        # systematic errors: the wrong set never turns a miss into anything but 0 or a false call into anything but 1
        assert ((labels[wrong] == 1) | (truth == 1) | (labels[wrong] == truth)).all()
    assert 0.4 < np.mean(cues) < 0.6
    accuracy_a = 1 - np.sum(errors["A"]) / len(cues)
    accuracy_b = 1 - np.sum(errors["B"]) / len(cues)
    assert abs(accuracy_a - accuracy_b) < 0.04 and accuracy_a < 0.9, (accuracy_a, accuracy_b)  # neither better overall


def test_synth_cxr_and_the_spec_check(tmp_path):
    manifest = B.build_benchmark("synth-cxr", tmp_path, TINY)
    assert verify(tmp_path) == {"train": 120, "test": 80}
    assert manifest["label_sets"] == ["negbio_u0", "negbio_u1", "chexpert_u0", "chexpert_u1"]
    assert manifest["splits"]["test"]["has_truth"]
    assert B.build_benchmark("synth-cxr", tmp_path, TINY) == manifest  # reused as it is
    with pytest.raises(ValueError, match="built from another spec"):
        B.build_benchmark("synth-cxr", tmp_path, B.Scale(image_size=32, train=100, test=80))


def test_a_benchmark_without_its_files_is_skipped_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv(B.SHARED_DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(B.BenchmarkUnavailable, match=r"cifar10h: skipped, .*cifar10_test.npz.*not found"):
        B.build_benchmark("cifar10h", tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()


def _need_cifar():
    data = B.shared_data_dir()
    if B.missing_files(B.BENCHMARKS["cifar10h"], data):
        pytest.skip(f"CIFAR benchmarks need {data}/cifar10-test (../shared/data beside the repository)")


def _noise(shard_dir):
    labels, truth = zip(*[(s[0], s[1]) for s in samples(shard_dir)])
    labels, truth = np.stack(labels), np.stack(truth)
    return (labels.argmax(2) != truth.argmax(1)[:, None]).mean(0)


def test_cifar10_paper_annotators_have_the_papers_noise_levels(tmp_path):
    _need_cifar()
    manifest = B.build_benchmark("cifar10-paper", tmp_path, TINY)  # the first 1,000 images
    assert verify(tmp_path) == {"train": 800, "test": 200}
    assert manifest["label_sets"] == ["hs", "sf", "oc", "ad", "avg"] and manifest.get("label_kind") == "multiclass"
    noise = _noise(tmp_path)
    for level, observed in zip((0.30, 0.40, 0.50, 1.00, 0.45), noise):  # Table 2; binomial sd at n=1000: 0.016
        assert abs(observed - level) < 0.05, (level, observed)


def test_cifar10h_draws_three_human_annotators(tmp_path):
    _need_cifar()
    manifest = B.build_benchmark("cifar10h", tmp_path, TINY)
    assert verify(tmp_path) == {"train": 800, "test": 200}
    assert manifest["label_sets"] == ["human1", "human2", "human3"]
    assert all(0.0 < n < 0.15 for n in _noise(tmp_path))  # CIFAR-10H votes: a few % of human errors


def test_plan_expands_label_sets_and_selects_by_pattern(tmp_path):
    bench = B.BENCHMARKS["instance"]
    table = {"instance": (bench, ["A", "B"], tmp_path / "shards")}
    labels = [m.label for m in expand_methods(["A", "B"])]
    assert labels == ["aol", "aol:paper", "aol:paper_per_finding", "aol:global", "aol:features", "aol:free", "aol:meta",
                      "aol:independent", "aol:one_regime", "aol:gold", "aol:regimes_free",
                      "single:A", "single:B", "majority", "soft_average", "cm", "truth", "best_choice"]
    assert [m for m in labels if is_baseline(m)] == ["single:A", "single:B", "majority", "soft_average", "cm"]
    runs = plan(table, tmp_path, 3)  # without --methods: the default rows, not the variants studied on their own
    assert len(runs) == 8 * 3 and {r.seed for r in runs} == {0, 1, 2}
    assert "aol:global" not in {r.method for r in runs} and "aol:paper" in {r.method for r in runs}
    assert [r.method for r in plan(table, tmp_path, 1, ["aol", "aol:*"])][:3] == ["aol", "aol:paper", "aol:paper_per_finding"]
    single = [r for r in runs if r.method == "single:B" and r.seed == 1][0]
    assert "method.single_label_set=B" in single.overrides and "train.seed=1" in single.overrides
    assert single.final_dir == tmp_path / "runs" / "instance" / "single-B-s1"
    assert [r.method for r in plan(table, tmp_path, 1, ["single:*", "truth"])] == ["single:A", "single:B", "truth"]
    with pytest.raises(ValueError, match="matches no method"):
        plan(table, tmp_path, 1, ["nope"])
    variant = plan(table, tmp_path, 1, ["aol:new"], methods=(*METHODS, Method("aol:new", ("method.k=5",), default=False)))
    assert [r.method for r in variant] == ["aol:new"] and "method.k=5" in variant[0].overrides
    # later overrides win: the preset's for this benchmark, then the user's, then the method's
    (run,) = plan(table, tmp_path, 1, ["majority"], per_benchmark={"instance": ("train.steps=600", "method.k=5")},
                  extra=("train.steps=7", "method.k=9"))
    o = run.overrides
    assert o.index("train.steps=600") < o.index("train.steps=7") < o.index("method.name=majority")
    assert o.index("method.k=5") < o.index("method.k=9")
    # a user's key that the method row sets itself would be silently overruled: refused, naming both
    with pytest.raises(ValueError, match=r"--set method.name=cm: method row majority sets method.name=majority"):
        plan(table, tmp_path, 1, ["majority"], extra=("method.name=cm",))
    with pytest.raises(ValueError, match="aol:gold sets data.gold_samples"):
        plan(table, tmp_path, 1, ["aol", "aol:gold"], extra=("data.gold_samples = 50",))
    assert len(plan(table, tmp_path, 1, ["aol"], extra=("data.gold_samples=50", "data.gold_split=train"))) == 1


def test_a_methods_typo_is_refused_before_any_shard_is_built(tmp_path):
    assert impossible(["aol", "aol:*", "single:*", "single:hs", "sing*", "*", "majority"]) == []
    assert impossible(["aol:paperr", "majorty", "singel:hs", "cm?"]) == ["aol:paperr", "majorty", "singel:hs", "cm?"]
    proc = subprocess.run([BIN / "aol", "study", "--preset", "smoke", "--out", tmp_path, "--methods", "aol,majorty"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.startswith("--methods majorty: matches no method; known: aol, aol:paper")
    assert not (tmp_path / "shards").exists()


def test_results_csv_survives_a_kill_mid_row(tmp_path):
    path = tmp_path / "results.csv"
    row = {"benchmark": "b", "method": "m", "seed": 0, "metric": "auroc", "value": 0.75, "steps": 2, "seconds": 1.5,
           "run_dir": "runs/b/m-s0"}
    append_result(path, row)
    append_result(path, {**row, "seed": 1, "value": None, "seconds": None})
    with open(path, "a") as f:
        f.write("b,m,2,auroc,0.7")  # the study died while writing this row
    rows = read_results(path)
    assert [(r["seed"], r["value"], r["seconds"]) for r in rows] == [(0, 0.75, 1.5), (1, None, None)]
    assert path.read_text().endswith("\n")
    append_result(path, {**row, "seed": 2})
    assert [r["seed"] for r in read_results(path)] == [0, 1, 2]
    assert path.read_text().splitlines()[0] == "benchmark,method,seed,metric,value,steps,seconds,run_dir"


def test_summary_statistics_from_a_hand_made_results_csv(tmp_path):
    path = tmp_path / "results.csv"
    values = {  # benchmark "b": the truth ceiling is highest but is no baseline; cm is the best baseline
        "aol": [0.80, 0.84, 0.82], "majority": [0.70, 0.72, 0.71], "cm": [0.75, 0.78, 0.72], "single:x": [0.60, 0.61],
        "truth": [0.90, 0.91, 0.92],
    }
    for method, vs in values.items():
        for seed, v in enumerate(vs):
            append_result(path, {"benchmark": "b", "method": method, "seed": seed, "metric": "auroc", "value": v,
                                 "steps": 2, "seconds": 1.0, "run_dir": f"r/{method}-{seed}"})
    append_result(path, {"benchmark": "b", "method": "aol", "seed": 3, "metric": "auroc", "value": None,
                         "steps": 2, "seconds": 1.0, "run_dir": "r/aol-3"})  # metric missing: not counted
    append_result(path, {"benchmark": "c", "method": "aol", "seed": 0, "metric": "accuracy", "value": 0.5,
                         "steps": 2, "seconds": 1.0, "run_dir": "r/c"})
    summary = summarize(read_results(path))
    b = summary["benchmarks"]["b"]
    assert summary["best_baseline"] == {"b": "cm", "c": None}
    assert b["aol"]["seeds"] == 3 and b["aol"]["missing"] == 1
    assert math.isclose(b["aol"]["mean"], 0.82) and math.isclose(b["aol"]["std"], statistics.stdev([0.80, 0.84, 0.82]))
    diff = b["aol"]["vs_best_baseline"]  # paired per seed: (0.05, 0.06, 0.10)
    assert diff["baseline"] == "cm" and diff["seeds"] == 3
    assert math.isclose(diff["mean"], 0.07) and math.isclose(diff["std"], statistics.stdev([0.05, 0.06, 0.10]))
    assert diff["clear"] is True  # 0.07 > 2 x 0.03, twice the larger spread (cm's)
    assert b["majority"]["vs_best_baseline"]["clear"] is False and b["cm"]["vs_best_baseline"]["mean"] == 0.0
    single = b["single:x"]["vs_best_baseline"]  # only the seeds both have
    assert single["seeds"] == 2 and math.isclose(single["mean"], ((0.60 - 0.75) + (0.61 - 0.78)) / 2)
    truth = b["truth"]["vs_best_baseline"]
    assert math.isclose(truth["mean"], 0.16) and truth["clear"] is True
    assert summary["benchmarks"]["c"]["aol"] == {"metric": "accuracy", "mean": 0.5, "std": 0.0, "seeds": 1,
                                                 "values": {"0": 0.5}, "vs_best_baseline": None}
    assert not any("room" in m for m in b.values())  # no best_choice runs: no share of its room
    for seed, v in enumerate([0.85, 0.86, 0.87]):  # the perfect choice among the label sets gains 0.11 over cm
        append_result(path, {"benchmark": "b", "method": "best_choice", "seed": seed, "metric": "auroc", "value": v,
                             "steps": 2, "seconds": 1.0, "run_dir": f"r/best_choice-{seed}"})
    summary = summarize(read_results(path))
    b = summary["benchmarks"]["b"]
    assert math.isclose(b["aol"]["room"], 0.07 / 0.11) and math.isclose(b["best_choice"]["room"], 1.0)
    assert math.isclose(b["majority"]["room"], -0.04 / 0.11) and b["cm"]["room"] == 0.0
    from aol_dist.study.summary import tables

    text = _render(tables(summary)[0])
    assert "share of best_choice's gain" in text and "64%" in text  # aol: 0.07 of 0.11
    # a later row of the same run replaces the earlier one
    append_result(path, {"benchmark": "b", "method": "truth", "seed": 0, "metric": "auroc", "value": 0.93,
                         "steps": 2, "seconds": 1.0, "run_dir": "r/truth-0"})
    assert math.isclose(summarize(read_results(path))["benchmarks"]["b"]["truth"]["mean"], (0.93 + 0.91 + 0.92) / 3)


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(table)
    return console.export_text()


def _study(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [BIN / "aol", "study", "--preset", "smoke", "--out", out, "--benchmarks", "one-clean",
           "--methods", "majority,single:clean", "--seeds", "2", "--parallel", "2", "--json", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_a_killed_study_skips_finished_runs_and_ends_with_the_same_summary(tmp_path):
    first = _study(tmp_path)
    printed = json.loads(first.stdout.strip().splitlines()[-1])  # --json: the last line is one JSON object
    one_clean = printed["benchmarks"]["one-clean"]
    assert set(one_clean) == {"majority", "single:clean"}
    for stats in one_clean.values():
        assert stats["metric"] == "auroc" and stats["seeds"] == 2
        assert isinstance(stats["mean"], float) and isinstance(stats["std"], float)
    rows = read_results(tmp_path / "results.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [("majority", 0), ("majority", 1), ("single:clean", 0),
                                                              ("single:clean", 1)]
    assert all(r["benchmark"] == "one-clean" and r["steps"] == 2 and r["seconds"] > 0 and 0 < r["value"] <= 1
               and Path(r["run_dir"]).is_dir() for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmarks"] == printed["benchmarks"] and (tmp_path / "study.png").stat().st_size > 0

    # the state a kill leaves: one run renamed back to unfinished, its row cut mid-line;
    # another finished run whose row was never written
    runs = tmp_path / "runs" / "one-clean"
    (runs / "single-clean-s1").rename(runs / "single-clean-s1.incomplete")
    kept = [line for line in (tmp_path / "results.csv").read_text().splitlines()
            if not line.startswith(("one-clean,single:clean,1,", "one-clean,majority,0,"))]
    (tmp_path / "results.csv").write_text("\n".join(kept) + "\none-clean,single:clean,1,auroc,0.5")
    untouched = (runs / "majority-s1" / "model.pt").stat().st_mtime_ns
    second = _study(tmp_path, "--launch", "exec")  # the other way to start a run: same training, same numbers
    assert "4 runs: 3 finished before, 1 to run" in second.stderr
    assert (runs / "majority-s1" / "model.pt").stat().st_mtime_ns == untouched
    assert json.loads(second.stdout.strip().splitlines()[-1])["benchmarks"] == printed["benchmarks"]
    assert len(read_results(tmp_path / "results.csv")) == 4

    before = (tmp_path / "results.csv").read_text()
    third = _study(tmp_path)
    assert "4 runs: 4 finished before, 0 to run" in third.stderr
    assert (tmp_path / "results.csv").read_text() == before
    assert json.loads(third.stdout.strip().splitlines()[-1])["benchmarks"] == printed["benchmarks"]


def test_a_study_directory_of_other_settings_is_refused(tmp_path):
    _study(tmp_path, "--dry-run")
    proc = subprocess.run([BIN / "aol", "study", "--preset", "smoke", "--out", tmp_path, "--set", "train.steps=3",
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "use another --out" in proc.stderr
    bad = subprocess.run([BIN / "aol", "study", "--preset", "smoke", "--out", tmp_path / "x", "--set", "train.steps=no",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "train.steps: cannot read 'no' as int" in bad.stderr


def _descendants(pid):
    """Every process below ``pid`` (from /proc: pid -> parent pid)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


def _running(pids):
    from aol_dist.lifeline import alive

    return {p for p in pids if alive(p)}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_study_leaves_no_run_going(tmp_path, sig):
    """Killing the study (kill, a scheduler's limit, SIGKILL) ends its runs too: none goes on writing a run
    directory that the next study would start again."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    study = subprocess.Popen([BIN / "aol", "study", "--preset", "smoke", "--out", tmp_path, "--benchmarks", "instance",
                              "--methods", "majority", "--seeds", "2", "--parallel", "2", "--set", "train.steps=100000"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = set()
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "runs" / "instance").glob("*.incomplete"))) < 2:  # both runs training
            assert time.monotonic() < deadline and study.poll() is None, "the study's runs never started"
            time.sleep(0.5)
        runs = _descendants(study.pid)
        assert runs
        study.send_signal(getattr(signal, sig))
        study.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _running(runs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _running(runs), f"still running after the study's {sig}: {_running(runs)}"
        assert sorted(p.name for p in (tmp_path / "runs" / "instance").glob("*.incomplete")) == [
            "majority-s0.incomplete", "majority-s1.incomplete"]  # unfinished, restarted by the next study
    finally:  # the fork server and the runs may have been reparented: kill what was seen below the study
        study.kill()
        for p in _running(runs | _descendants(study.pid)):
            os.kill(p, 9)


def test_trust_summary_reads_each_runs_attention_json(tmp_path):
    from aol_dist.study.summary import trust_summary, trust_tables

    path = tmp_path / "results.csv"
    for seed, (p_u0, right_pf) in enumerate([(0.97, True), (0.93, False)]):
        run = tmp_path / f"aol-{seed}"
        run.mkdir()
        sets = ["x_u0", "x_u1"]
        (run / "attention.json").write_text(json.dumps({
            "label_sets": sets, "mean": {"x_u0": 0.5, "x_u1": 0.5},
            "per_finding": {"F": {"x_u0": p_u0 - 0.4, "x_u1": 0.55}},
            "accuracy_vs_truth": {"F": {"x_u0": 0.96, "x_u1": 0.94}}}))  # u0 better: trusted to u0 in seed 0 only
        append_result(path, {"benchmark": "b", "method": "aol", "seed": seed, "metric": "auroc", "value": 0.8,
                             "steps": 2, "seconds": 1.0, "run_dir": str(run)})
    append_result(path, {"benchmark": "b", "method": "majority", "seed": 0, "metric": "auroc", "value": 0.7,
                         "steps": 2, "seconds": 1.0, "run_dir": str(tmp_path / "no-attention")})
    trust = trust_summary(read_results(path))
    assert list(trust) == ["b"] and list(trust["b"]) == ["aol"]  # majority wrote no trust
    stats = trust["b"]["aol"]
    assert stats["seeds"] == 2
    assert stats["uncertain_right"] == {"mean": 0.5, "std": statistics.stdev([1, 0]), "of": 1}
    assert stats["u0_better_right"]["mean"] == 0.5 and stats["per_finding_right"]["mean"] == 0.5
    assert stats["trusted_in_top_two"]["mean"] == 1.0  # two sets: always in the top two
    assert trust_summary(read_results(path), keys={("b", "aol", 1)})["b"]["aol"]["uncertain_right"]["mean"] == 0.0
    assert len(trust_tables(trust)) == 1


def test_the_gold_row_takes_300_studies_or_a_tenth_of_a_smaller_training_split(tmp_path):
    from helpers import write_fake_shards

    bench = B.BENCHMARKS["instance"]
    for train, want in (([32, 32], 6), ([2000, 2000], 300)):
        shards = tmp_path / f"shards-{sum(train)}"
        write_fake_shards(shards, {"train": train, "test": [8]})
        (run,) = plan({"instance": (bench, ["s0", "s1"], shards)}, tmp_path, 1, ["aol:gold"])
        assert "data.gold_split=train" in run.overrides and f"data.gold_samples={want}" in run.overrides
