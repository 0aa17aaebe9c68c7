"""benchmarks/harness.py, the mechanics every benchmark script shares: the offline environment, runs skipped when
done, JSON-line workers, atomic result files in each script's format, and the summaries."""

import json
import math
import sys

import pytest

from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402


def test_offline_env_caps_threads_only_when_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = harness.offline_env()
    assert {k: env[k] for k in harness.OFFLINE} == {k: "1" for k in harness.OFFLINE}
    assert "OMP_NUM_THREADS" not in env
    env = harness.offline_env(threads=1, PYTHONPATH="x")
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["PYTHONPATH"]) == ("1", "1", "x")


@pytest.mark.parametrize("indent, newline", [(1, False), (2, True), (None, False)])
def test_write_json_is_each_scripts_format_and_atomic(tmp_path, indent, newline):
    data = {"b": [1, 2.5], "a": {"x": None}}
    path = harness.write_json(tmp_path / "sub" / "r.json", data, indent=indent, newline=newline)
    assert path.read_text() == json.dumps(data, indent=indent) + ("\n" if newline else "")
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_train_once_skips_a_finished_run_and_names_a_failed_one(tmp_path, monkeypatch):
    script = tmp_path / "train.py"  # a stand-in for train_sadm.py: records its arguments, fails on --bad
    script.write_text("import sys\nopen(sys.argv[0] + '.calls', 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                      "sys.exit('unknown flag --bad' if '--bad' in sys.argv else 0)\n")
    monkeypatch.setattr(harness, "TRAIN_SCRIPT", script)
    out = tmp_path / "run"
    out.mkdir()
    for name in harness.FINISHED_RUN:
        (out / name).write_text("{}")
    assert harness.train_once(["--bad"], out, "training x") is None  # done: nothing runs
    (out / "model_index.json").unlink()
    assert harness.train_once(["--good", "1"], out, "training x") >= 0
    with pytest.raises(SystemExit, match=r"^training x failed:\nunknown flag --bad"):
        harness.train_once(["--bad"], out, "training x", error=SystemExit)
    assert (tmp_path / "train.py.calls").read_text().splitlines() == ["--good 1", "--bad"]


def test_a_worker_answers_with_its_last_json_line(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\nimport harness\n"
                      "print('other output first')\nharness.answer(lambda a, b: {'sum': a + b}, sys.argv[2])\n")
    assert harness.spawn_worker(script, "--_worker", [2, 3], "worker") == {"sum": 5}
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.exit('broken on purpose')\n")
    with pytest.raises(RuntimeError, match="^worker bad failed:\nbroken on purpose"):
        harness.spawn_worker(bad, "--_worker", [], "worker bad")


def test_summaries():
    assert harness.summarize([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2), "n": 2}
    assert list(harness.summarize([5.0], range_=True).items()) == [("mean", 5.0), ("std", 0.0), ("min", 5.0),
                                                                    ("max", 5.0), ("n", 1)]
    assert harness.quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0,
                                                            "max": 5.0, "n": 5}
    ci = harness.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert (ci["mean"], ci["n"], ci["diffs"]) == (2.0, 3, [1.0, 2.0, 3.0])
    assert ci["low"] == pytest.approx(2.0 - half) and ci["high"] == pytest.approx(2.0 + half)
    one = harness.t_interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["high"])


def test_peak_rss_reads_and_resets():
    assert harness.proc_status_kb("VmRSS") > 0
    if harness.reset_peak_rss():
        assert harness.proc_status_kb("VmHWM") <= harness.proc_status_kb("VmRSS") * 1.5
    with pytest.raises(RuntimeError, match="NoSuchField not in /proc/self/status"):
        harness.proc_status_kb("NoSuchField")
