"""benchmarks/study_logs.py: the study runs' logged scalars, averaged per window and seed, beside their paired gains."""

import json
import statistics
import sys

import pytest

from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import study_logs  # noqa: E402


def _log_run(folder, values: dict[str, list[float]]) -> None:
    """A run folder whose tensorboard logs hold each tag's values at steps 1, 2, ..."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "logs" / "sadm-finetune"))
    for tag, series in values.items():
        for step, value in enumerate(series, start=1):
            writer.add_scalar(tag, value, step)
    writer.close()


def _report(path, regime, prefix, sadm, plain):
    summary = {regime: {f"{prefix}sadm": {"per_seed": {str(s): {"fid": v} for s, v in sadm.items()}},
                        f"{prefix}plain-equal-compute": {"per_seed": {str(s): {"fid": v} for s, v in plain.items()}}}}
    path.write_text(json.dumps({"summary": summary}))
    return path


def test_study_logs_averages_each_window_per_seed_then_over_seeds_and_pairs_the_gains(tmp_path, capsys):
    runs = tmp_path / "runs"
    # regime a: three seeds; structure_loss_g rises 1, 2, 3, 4 (x seed + 1), d_pair_cos only on steps 1-2
    for seed in range(3):
        _log_run(runs / "a" / f"sadm-seed{seed}", {"structure_loss_g": [(seed + 1) * v for v in (1, 2, 3, 4)],
                                                    "d_pair_cos": [0.5, 0.7]})
    _log_run(runs / "b" / "full-sadm-seed4", {"structure_loss_g": [9, 9, 9, 9], "d_pair_cos": [0.1, 0.1]})
    (runs / "a" / "sadm-seed7").mkdir()  # no logs: not a run to read
    (runs / "a" / "plain-seed0" / "logs").mkdir(parents=True)  # another arm
    report = _report(tmp_path / "a.json", "a", "", {0: 9.0, 1: 8.0, 2: 10.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    out = tmp_path / "logs.json"
    result = study_logs.main(["--work_dir", str(tmp_path), "--regimes", "a", "b", "--tags", "structure_loss_g",
                              "d_pair_cos", "--windows", "1-2", "3-4", "--reports", str(report), "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["command"].startswith("python benchmarks/study_logs.py --work_dir <work_dir> --regimes a b")
    a, b = result["regimes"]["a"], result["regimes"]["b"]
    assert a["seeds"] == [0, 1, 2] and a["runs"] == ["sadm-seed0", "sadm-seed1", "sadm-seed2"]
    assert b["seeds"] == [4] and b["runs"] == ["full-sadm-seed4"]
    early, late = a["logs"]["structure_loss_g"]["1-2"], a["logs"]["structure_loss_g"]["3-4"]
    assert early["per_seed"] == pytest.approx([1.5, 3.0, 4.5]) and late["per_seed"] == pytest.approx([3.5, 7.0, 10.5])
    assert early["mean"] == pytest.approx(3.0) and early["sd"] == pytest.approx(1.5)
    assert a["logs"]["d_pair_cos"]["3-4"] == {"mean": None, "sd": None, "per_seed": [None, None, None]}
    assert b["logs"]["structure_loss_g"]["3-4"] == {"mean": 9.0, "sd": None, "per_seed": [9.0]}
    # the gain: 100 (SADM - plain at its compute) / plain, per seed; b has no report
    assert a["equal_compute_gain_pct"] == pytest.approx({"0": -10.0, "1": -20.0, "2": 0.0})
    assert "equal_compute_gain_pct" not in b
    corr = result["correlation"]
    assert corr["tag"] == "structure_loss_g" and corr["regimes"] == ["a"]
    expected = statistics.correlation([3.5, 7.0, 10.5], [-10.0, -20.0, 0.0])
    assert corr["windows"]["3-4"]["r"] == pytest.approx(expected) and corr["windows"]["3-4"]["n"] == 3
    assert corr["windows"]["3-4"]["r_within_regime"] == pytest.approx(expected)  # one regime: centring changes nothing
    printed = capsys.readouterr().out
    assert "| a | 3 | 7 ± 3.5 | — | -10.0% |" in printed and "| b | 1 | 9 | — | — |" in printed


def test_the_within_regime_correlation_takes_each_regime_s_means_out():
    # two regimes whose seeds go the same way within each, but whose means go the other way between them
    result = {"regimes": {
        "a": {"seeds": [0, 1, 2], "logs": {"t": {"w": {"per_seed": [1.0, 2.0, 3.0]}}},
              "equal_compute_gain_pct": {"0": 10.0, "1": 11.0, "2": 12.0}},
        "b": {"seeds": [0, 1, 2], "logs": {"t": {"w": {"per_seed": [11.0, 12.0, 13.0]}}},
              "equal_compute_gain_pct": {"0": -10.0, "1": -9.0, "2": -8.0}}}}
    corr = study_logs.correlation(result, ["a", "b"], "t", "w")
    assert corr["n"] == 6 and corr["r"] < -0.9 and corr["r_within_regime"] == pytest.approx(1.0)


def test_study_logs_refuses_bad_input_before_reading_any_run(tmp_path):
    _log_run(tmp_path / "runs" / "a" / "sadm-seed0", {"structure_loss_g": [1.0]})
    base = ["--work_dir", str(tmp_path), "--output", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit, match=r"no run of 'sadm' \(or 'full-sadm'\) with logs under .*runs/missing"):
        study_logs.main([*base, "--regimes", "a", "missing"])
    with pytest.raises(SystemExit, match=r"--windows: '300' is not FIRST-LAST"):
        study_logs.main([*base, "--regimes", "a", "--windows", "300"])
    with pytest.raises(SystemExit, match=r"--correlate: b not in --regimes"):
        study_logs.main([*base, "--regimes", "a", "--correlate", "a", "b"])
    with pytest.raises(SystemExit, match=r"--reports: .*nope.json not found"):
        study_logs.main([*base, "--regimes", "a", "--reports", str(tmp_path / "nope.json")])
    report = _report(tmp_path / "r.json", "a", "", {0: 1.0}, {0: 1.0})
    data = json.loads(report.read_text())
    del data["summary"]["a"]["plain-equal-compute"]
    report.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"holds a without 'sadm' and plain at its compute"):
        study_logs.main([*base, "--regimes", "a", "--reports", str(report)])
    assert not (tmp_path / "out.json").exists()
