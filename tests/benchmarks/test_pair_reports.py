"""benchmarks/pair_reports.py: two arms paired by seed across the study's _eval_noise reports, per draw."""

import json
import sys

import pytest

from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import pair_reports  # noqa: E402

R = "stage2"


def _report(folder, stem, fid):
    """A study's _eval_noise file holding ``fid``: {(arm, seed): {draw: FID}} of regime R."""
    data = {f"{R}/{arm}/seed{seed}": draws for (arm, seed), draws in fid.items()}
    (folder / f"{stem}_eval_noise.json").write_text(json.dumps({"equal_compute": {}, "fid": data}))


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(pair_reports, "RESULTS", tmp_path)
    return tmp_path


def test_an_arm_of_one_report_pairs_with_an_arm_of_another_on_the_seeds_and_draws_both_have(results, capsys):
    # the new report holds the new arm and one plain checkpoint also in the old report (the same chain: equal FIDs)
    _report(results, "old", {("combo", 0): {"ddim": 1.0, "ddpm": 0.5}, ("combo", 1): {"ddim": 1.2, "ddpm": 0.7},
                             ("combo", 2): {"ddim": 1.1}, ("plain", 0): {"ddim": 1.3}})
    _report(results, "new", {("band", 0): {"ddim": 0.9, "ddpm": 0.6}, ("band", 1): {"ddim": 1.3, "ddpm": 0.6},
                             ("band", 3): {"ddim": 0.1}, ("plain", 0): {"ddim": 1.3 + 1e-9}})
    result = pair_reports.main(["--regime", R, "--reports", "old", "new_eval_noise.json",
                                "--pairs", "band:combo", "--output", "cross"])
    ddim, ddpm = result["pairs"]["band - combo"]["ddim"], result["pairs"]["band - combo"]["ddpm"]
    assert ddim["seeds"] == [0, 1] and ddim["diffs"] == pytest.approx([-0.1, 0.1])  # seed 2, 3: one side only
    assert ddim["mean"] == pytest.approx(0.0) and ddim["relative_to"] == pytest.approx(1.1) and ddim["better"] == 1
    assert ddpm["mean"] == pytest.approx(0.0) and ddpm["low"] < 0 < ddpm["high"] and ddpm["relative_to"] == pytest.approx(0.6)
    assert json.loads((results / "cross.json").read_text())["pairs"]["band - combo"]["ddpm"]["n"] == 2
    assert result["reports"] == ["old_eval_noise.json", "new_eval_noise.json"]
    assert "band - combo" in capsys.readouterr().out


def _study_report(folder, stem, fid):
    """A study report (sadm_study.py's <stem>.json) whose runs of regime R scored ``fid``: {(arm, seed): FID}."""
    summary = {}
    for (arm, seed), value in fid.items():
        summary.setdefault(arm, {"n": 0, "per_seed": {}})["per_seed"][str(seed)] = {"fid": value, "kid_mean": 0.1}
        summary[arm]["n"] += 1
    (folder / f"{stem}.json").write_text(json.dumps({"summary": {R: summary}, "seeds": [0, 1]}))


def test_a_study_report_pairs_on_the_study_draw_and_must_agree_with_the_eval_noise_report_of_its_chain(results):
    # the committed report holds plain at its compute and the old arm; the new one (study report and draws) the new arm
    _study_report(results, "old", {("equal", 0): 3.1, ("equal", 1): 3.2, ("combo", 0): 3.0, ("combo", 1): 2.9,
                                   ("plain", 0): 3.3})
    _study_report(results, "new", {("dose", 0): 2.8, ("dose", 1): 3.0, ("plain", 0): 3.3})
    _report(results, "new", {("dose", 0): {"ddim25-s1234": 2.8, "ddpm50-s1234": 1.0},
                             ("plain", 0): {"ddim25-s1234": 3.3}})
    result = pair_reports.main(["--regime", R, "--reports", "old", "new", "--pairs", "dose:equal", "dose:combo",
                                "--output", "cross"])
    assert result["reports"] == ["old.json", "new_eval_noise.json", "new.json"]
    vs_equal = result["pairs"]["dose - equal"]
    assert list(vs_equal) == ["ddim25-s1234"]  # the old arm was never drawn with DDPM: no pair there
    assert vs_equal["ddim25-s1234"]["diffs"] == pytest.approx([-0.3, -0.2]) and vs_equal["ddim25-s1234"]["better"] == 2
    assert result["pairs"]["dose - combo"]["ddim25-s1234"]["diffs"] == pytest.approx([-0.2, 0.1])
    # a rebuilt chain that scores the shared plain run otherwise is refused, whichever file holds it
    _study_report(results, "other", {("dose", 0): 2.8, ("plain", 0): 3.4})
    with pytest.raises(SystemExit, match=r"stage2/plain/seed0 on ddim25-s1234 is 3.3 in old.json but 3.4 in "
                                         r"other.json"):
        pair_reports.main(["--regime", R, "--reports", "old", "other", "--pairs", "dose:equal", "--output", "x"])


def test_reports_of_different_chains_are_refused(results):
    _report(results, "old", {("plain", 0): {"ddim": 1.3}, ("combo", 0): {"ddim": 1.0}})
    _report(results, "new", {("plain", 0): {"ddim": 1.4}, ("band", 0): {"ddim": 0.9}})
    with pytest.raises(SystemExit, match=r"stage2/plain/seed0 on ddim is 1.3 in old_eval_noise.json but 1.4 in "
                                         r"new_eval_noise.json: the reports come from different chains"):
        pair_reports.main(["--regime", R, "--reports", "old", "new", "--pairs", "band:combo", "--output", "x"])
    assert not (results / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--reports", "missing"], "--reports: no missing_eval_noise.json or missing.json in "),
    (["--reports", "old", "--pairs", "band:combo"], "--pairs: no report holds stage2/band"),
    (["--reports", "old", "--pairs", "combo-plain"], "--pairs: 'combo-plain' is not arm:other"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(results, argv, message):
    _report(results, "old", {("combo", 0): {"ddim": 1.0}, ("plain", 0): {"ddim": 1.3}})
    args = {"--regime": [R], "--pairs": ["combo:plain"], "--output": ["x"]}
    for i in range(0, len(argv), 2):
        args[argv[i]] = [argv[i + 1]]
    args.setdefault("--reports", ["old"])
    with pytest.raises(SystemExit, match=message):
        pair_reports.main([token for flag, values in args.items() for token in (flag, *values)])
    assert not (results / "x.json").exists()
