"""benchmarks/sadm_study.py's arm tables: every arm a report pairs or re-evaluates is one the study can run, and
every plain-at-equal-compute arm really gets more steps than its regime."""

import sys

from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import sadm_study as study  # noqa: E402


def test_each_eval_noise_regime_has_one_baseline_and_every_arm_pairs_with_it():
    regimes = {regime for regime, _ in study.EVAL_NOISE_ARMS}
    assert set(study.EVAL_NOISE_PLAIN) == regimes
    for regime, arm in study.EVAL_NOISE_ARMS:
        flags, paired_with = study._STUDY_ARMS[(regime, arm)]
        assert paired_with in (None, study.EVAL_NOISE_PLAIN[regime]), (regime, arm)


def test_also_paired_names_arms_the_study_defines_in_the_same_regime():
    for (regime, arm), other in study.ALSO_PAIRED.items():
        assert (regime, arm) in study._STUDY_ARMS, (regime, arm)
        assert (regime, other) in study._STUDY_ARMS, (regime, other)


def test_plain_at_equal_compute_gets_more_steps_than_its_regime():
    checked = 0
    for (regime, arm), (flags, paired_with) in study._STUDY_ARMS.items():
        if "equal-compute" not in arm:
            continue
        steps = int(flags[flags.index("--max_train_steps") + 1])
        assert steps > study.REGIMES[regime]["steps"], (regime, arm, steps)
        assert (regime, arm) in study.ALSO_PAIRED, f"{regime}/{arm}: pair it with the SADM arm whose compute it has"
        checked += 1
    assert checked >= 10
