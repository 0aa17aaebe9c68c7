"""benchmarks/offset_dose.py: SADM - plain at equal compute per offset base, read from the study's reports."""

import importlib.util
import json
import sys

import pytest

from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import offset_dose  # noqa: E402


def _ci(mean, half, ref):
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": 5, "diffs": [mean] * 5, "relative_to": ref}


def _report(folder, stem, regime, pairs):
    """A study's _eval_noise file of ``regime``: its SADM - plain at equal compute per draw (and another regime's)."""
    equal = {f"{regime}/sadm - plain-equal-compute": pairs,
             "other-regime/sadm - plain-equal-compute": {"ddim25-s1234": _ci(9.0, 1.0, 3.0)}}
    (folder / f"{stem}_eval_noise.json").write_text(json.dumps({"equal_compute": equal, "fid": {}}))


def test_offset_dose_reads_each_base_s_equal_compute_pairing_per_draw_as_a_share_of_plain(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(offset_dose, "POINTS",
                        ((0.0, "committed", "avg", "rep_avg"), (2.0, "rebuilt", "dbl", "rep_dbl")))
    _report(tmp_path, "rep_avg", "avg", {"ddim25-s1234": _ci(0.05, 0.02, 2.0), "ddpm50-s1234": _ci(-0.1, 0.05, 1.0),
                                         "ddim25-s1235": _ci(5.0, 0.1, 1.0)})
    _report(tmp_path, "rep_dbl", "dbl", {"ddim25-s1234": _ci(-0.3, 0.1, 2.0), "ddpm50-s1234": None})
    result = offset_dose.main(["--results", str(tmp_path), "--output", str(tmp_path / "dose.json")])
    avg, dbl = result["points"]
    assert set(avg["sadm_minus_plain_equal_compute"]) == {"ddim25-s1234", "ddpm50-s1234"}  # the other draws: not read
    study = avg["sadm_minus_plain_equal_compute"]["ddim25-s1234"]
    assert study["n"] == 5 and study["mean"] == 0.05 and study["relative_to"] == 2.0
    assert study["pct"] == pytest.approx({"mean": 2.5, "low": 1.5, "high": 3.5})  # a share of plain's mean FID
    assert avg["sadm_minus_plain_equal_compute"]["ddpm50-s1234"]["pct"]["mean"] == pytest.approx(-10.0)
    assert dbl["sadm_minus_plain_equal_compute"]["ddpm50-s1234"] is None  # a draw not made: no point
    assert dbl["sadm_minus_plain_equal_compute"]["ddim25-s1234"]["pct"]["mean"] == pytest.approx(-15.0)
    assert (dbl["scale"], dbl["chain"], dbl["report"]) == (2.0, "rebuilt", "rep_dbl_eval_noise.json")
    assert json.loads((tmp_path / "dose.json").read_text()) == json.loads(json.dumps(result))
    out = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):  # a plot where matplotlib is installed, the points without it
        assert (tmp_path / "dose.png").stat().st_size > 0
    else:
        assert not (tmp_path / "dose.png").exists() and "matplotlib is not installed" in out
    assert "scale +2.0 (rebuilt, dbl): ddim25-s1234: -15.0%" in out and "ddpm50-s1234: —" in out


def test_offset_dose_names_the_missing_report_and_the_block_that_writes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(offset_dose, "POINTS", ((0.5, "committed", "half", "rep_half"),))
    with pytest.raises(SystemExit, match=r"rep_half_eval_noise\.json is missing: run its block with .*--eval_noise "
                                         r".*--only half/sadm,half/plain-equal-compute"):
        offset_dose.dose(tmp_path)
    _report(tmp_path, "rep_half", "other", {"ddim25-s1234": _ci(0.0, 0.1, 1.0)})
    with pytest.raises(SystemExit, match=r"pairs no sadm with plain-equal-compute of half"):
        offset_dose.dose(tmp_path)


def test_the_committed_offset_points_give_the_shares_the_docs_quote():
    """Read from benchmarks/results as committed: the numbers of docs/sadm-study.md's offset table."""
    by = {(p["scale"], p["chain"]): p["sadm_minus_plain_equal_compute"]
          for p in offset_dose.dose(offset_dose.RESULTS)["points"]}
    quoted = {(-1.0, "committed"): (-7.6, -8.3), (0.0, "committed"): (+2.4, +0.9),
              (0.5, "committed"): (-2.2, -3.6), (1.0, "committed"): (-8.7, -10.2), (2.0, "rebuilt"): (-8.0, -10.0)}
    for key, (ddim, ddpm) in quoted.items():
        assert round(by[key]["ddim25-s1234"]["pct"]["mean"], 1) == ddim
        assert round(by[key]["ddpm50-s1234"]["pct"]["mean"], 1) == ddpm
        assert by[key]["ddim25-s1234"]["n"] == 5
    assert round(by[(1.0, "rebuilt")]["ddim25-s1234"]["pct"]["mean"], 1) == -5.8
    assert round(by[(1.0, "rebuilt")]["ddpm50-s1234"]["pct"]["mean"], 1) == -6.3


def test_each_point_s_scale_is_its_base_s_place_on_the_line_sadm_study_builds():
    import sadm_study

    centre, point = "continue-24m-ema-constant", "continue-24m"
    for scale, _, regime, _ in offset_dose.POINTS:
        base = sadm_study.REGIMES[regime]["base"]
        if base in sadm_study.OFFSET_BASES:
            assert sadm_study.OFFSET_BASES[base] == (centre, point, scale), regime
        else:
            assert {centre: 0.0, point: 1.0}[base] == scale, regime
