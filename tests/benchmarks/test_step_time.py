"""benchmarks/step_time.py: each column's config, the lazy column's amortised cost, and the column filter."""

import sys

import pytest

from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import step_time  # noqa: E402


def test_each_column_turns_on_what_it_names():
    assert step_time.mode_overrides("tiny", "plain") == {"structure_weight": 0.0}
    assert step_time.mode_overrides("tiny", "sadm") == step_time.DEMO_SADM
    both = step_time.mode_overrides("tiny-6m", "sadm+sddit")
    assert "structure_weight" not in both or both["structure_weight"] > 0
    assert both["sddit_weight"] == 0.5 and "sddit_every" not in both
    lazy = step_time.mode_overrides("tiny-6m", "sadm+sddit-every4")
    assert lazy == {**both, "sddit_every": 4}  # the same term, on one update in four
    from sadm_finetune.config.run import build_config

    config = build_config({"pretrained_model_name_or_path": "p", "train_data_dir": "d", "output_dir": "o", **lazy})
    assert config.sddit.sddit_every == 4 and config.sddit.sddit_weight == 0.5 and config.sadm.structure_weight > 0


def test_a_lazy_column_is_priced_by_its_mean_step_time_and_the_others_keep_their_median():
    def run(mode, times):
        return {"model": "tiny", "mode": mode, "step_times_s": times, "step_cpu_times_s": times, "step_mem_mb": 1.0,
                "peak_mb": 2.0, "base_mb": 1.0}

    # plain 1.0 s a step; the lazy column: 1.0 s on three steps, 3.0 s on the fourth (median 1.0, mean 1.5)
    summary = step_time.summarise([run("plain", [1.0] * 8), run("sadm+sddit-every4", [3.0, 1.0, 1.0, 1.0] * 2)])
    ratio = summary["tiny"]["ratios"]["sadm+sddit-every4/plain"]
    assert ratio["time"] == pytest.approx(1.0) and ratio["time_mean"] == pytest.approx(1.5)
    assert summary["tiny"]["modes"]["sadm+sddit-every4"]["time_s_mean"] == pytest.approx(1.5)


@pytest.mark.parametrize("argv, message", [
    (["--modes", "plain,fast"], "'fast' is not a column"),
    (["--modes", "plain,sadm+sddit-every4"], "with --terms also"),  # a term's column needs --terms
])
def test_an_unknown_or_unrequested_column_is_refused_before_any_run(argv, message, monkeypatch):
    monkeypatch.setattr(step_time, "_spawn", lambda *a: pytest.fail("a worker was started"))
    with pytest.raises(SystemExit, match=message):
        step_time.main(["--models", "tiny", *argv])
