"""benchmarks/sadm_study.py's arm tables: every arm a report pairs or re-evaluates is one the study can run, and
every plain-at-equal-compute arm really gets more steps than its regime."""

import importlib.util
import sys

import pytest

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


def test_eval_noise_report_pairs_each_sadm_arm_with_plain_at_its_compute_on_every_draw(tmp_path):
    import json

    regime, sadm, plain_eq, plain = "continue-24m", "sadm", "plain-equal-compute", "plain"
    fids = {sadm: [5.0, 6.0, 7.0], plain_eq: [5.5, 6.25, 7.75], plain: [6.0, 7.0, 8.0]}
    # ALSO_PAIRED the other way round: the SADM arm names plain at its compute
    lam = {"full-sadm-lambda-0.03": [3.0, 3.0, 3.0], "full-plain-equal-compute": [4.0, 4.0, 4.0]}
    for (reg, arm), values in [*(((regime, a), v) for a, v in fids.items()),
                               *((("transfer-24m", a), v) for a, v in lam.items())]:
        for seed, fid in enumerate(values):
            out = tmp_path / "runs" / reg / f"{arm}-seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"metrics": {"fid": fid}}))
            # a second draw, 1 FID higher everywhere: the paired differences stay the same
            (out / "eval-ddim25-s1235.json").write_text(json.dumps({"metrics": {"fid": fid + 1}}))
            (out / "eval-ddim25-s1236.json").write_text(json.dumps({"metrics": {"fid": fid + 2}}))
            # another sampler at another level: it must not count as evaluation noise
            (out / "eval-ddpm50-s1234.json").write_text(json.dumps({"metrics": {"fid": fid / 10}}))
    result = study.eval_noise_report(tmp_path, [0, 1, 2], tmp_path / "report")
    ec = result["equal_compute"][f"{regime}/{sadm} - {plain_eq}"]
    for draw in ("ddim25-s1234", "ddim25-s1235"):
        assert ec[draw]["n"] == 3 and abs(ec[draw]["mean"] - (-0.5)) < 1e-9, (draw, ec[draw])
    # the share is of plain-at-equal-compute's mean FID on that draw (6.5, then 7.5)
    assert abs(ec["ddim25-s1234"]["relative_to"] - 6.5) < 1e-9 and abs(ec["ddim25-s1235"]["relative_to"] - 7.5) < 1e-9
    assert ec["ddim25-s1234-x5"] is None  # a draw nobody ran is reported as missing, not as 0
    # one checkpoint's FID over the three DDIM sampling seeds is fid, fid + 1, fid + 2: sd 1, whatever DDPM gave
    spread = result["checkpoint_spread"][f"{regime}/{sadm}"]
    assert spread["checkpoints"] == 3 and abs(spread["mean_sd_over_sampling_seeds"] - 1.0) < 1e-9, spread
    vs_plain = result["paired_vs_plain"][f"{regime}/{sadm}"]["ddim25-s1234"]
    assert vs_plain["n"] == 3 and abs(vs_plain["mean"] - (-1.0)) < 1e-9
    reverse = result["equal_compute"]["transfer-24m/full-sadm-lambda-0.03 - full-plain-equal-compute"]
    assert reverse["ddim25-s1234"]["mean"] == -1.0
    # rows in EVAL_NOISE_ARMS' order, whatever order ALSO_PAIRED lists them in: transfer-24m's plain at SADM's
    # compute (SADM, then lambda 0.03 against it) comes before continue-24m's
    keys = list(result["equal_compute"])
    assert keys.index("transfer-24m/full-sadm - full-plain-equal-compute") < keys.index(
        "transfer-24m/full-sadm-lambda-0.03 - full-plain-equal-compute") < keys.index(f"{regime}/{sadm} - {plain_eq}")
    assert json.loads((tmp_path / "report_eval_noise.json").read_text())["fid"]["continue-24m/sadm/seed2"] == {
        "ddim25-s1234": 7.0, "ddim25-s1235": 8.0, "ddim25-s1236": 9.0, "ddpm50-s1234": 0.7}
    png = tmp_path / "report_eval_noise.png"
    if importlib.util.find_spec("matplotlib"):  # a plot where matplotlib is installed, the report without it
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


def test_a_report_from_a_work_dir_with_fewer_runs_never_replaces_a_fuller_one(tmp_path, monkeypatch):
    import json

    import pytest

    full, empty, regime = tmp_path / "full", tmp_path / "empty", "continue-24m"
    for arm in ("sadm", "plain-equal-compute", "plain"):
        for seed in range(3):
            out = full / "runs" / regime / f"{arm}-seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"metrics": {m: 5.0 + seed + (arm == "sadm")
                                                                   for m in study.METRICS}}))
    report = tmp_path / "results" / "study"
    study.eval_noise_report(full, [0, 1, 2], report)
    written = study.eval_noise_path(report).read_text()
    study.eval_noise_report(full, [0, 1, 2], report)  # as many runs: rewritten
    with pytest.raises(SystemExit, match=r"--output: .*study_eval_noise.json summarises 9 runs and draws, the "
                                         r"work dir .*empty only 0; writing would lose results"):
        study.eval_noise_report(empty, [0, 1, 2], report)
    assert study.eval_noise_path(report).read_text() == written

    # the command line refuses before it trains anything (a broken check would reach regime_setup)
    def trained(*_):
        raise AssertionError("the study started training")

    monkeypatch.setattr(study, "regime_setup", trained)
    monkeypatch.setattr(study, "evaluate_draw", trained)
    arms = {k: v for k, v in study.SCALE_ARMS.items() if k[0] == regime}
    built = study.build_report(full, arms, [0, 1, 2])
    assert study.report_size(built) == 9  # three arms, three seeds
    report.with_suffix(".json").write_text(json.dumps(built))
    for argv in (["--scale"], ["--mechanism", "--eval_noise"]):
        monkeypatch.setattr(sys, "argv", ["sadm_study.py", *argv, "--work_dir", str(empty), "--output", str(report)])
        with pytest.raises(SystemExit, match="writing would lose results"):
            study.main()
    assert json.loads(report.with_suffix(".json").read_text()) == built


def test_a_report_on_arms_run_without_their_plain_pairs_what_it_can(tmp_path):
    """`--only continue-24m/sadm,continue-24m/plain-equal-compute` trains no plain: the report after each run must
    not fail on the missing pairing (it did: t_interval of no differences), and still pairs the two arms it has."""
    import json

    for arm, fids in (("sadm", [1.0, 2.0]), ("plain-equal-compute", [1.5, 2.0, 9.0])):
        for seed, fid in enumerate(fids):
            out = tmp_path / "runs" / "continue-24m" / f"{arm}-seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"metrics": {m: fid for m in study.METRICS}}))
    arms = {k: v for k, v in study.SCALE_ARMS.items() if k[0] == "continue-24m"}
    summary = study.build_report(tmp_path, arms, [0, 1, 2])["summary"]["continue-24m"]
    assert "paired" not in summary["sadm"] and "paired" not in summary["plain-equal-compute"]
    also = summary["plain-equal-compute"]["also_paired"]["sadm"]["fid"]  # over the two seeds both have
    assert also["n"] == 2 and also["mean"] == 0.25, also


def test_a_regime_on_a_fine_tuned_run_trains_that_run_first_and_fine_tunes_its_output(tmp_path, monkeypatch):
    regime = "transfer-24m-stage2"
    run_regime, arm, seed = study.REGIMES[regime]["base_run"]
    assert (run_regime, arm) in study._STUDY_ARMS and study._STUDY_ARMS[(run_regime, arm)][1] is None
    trained = []
    monkeypatch.setattr(study, "build_base", lambda name, work: work / "bases" / name)
    monkeypatch.setattr(study, "write_digits_dataset", lambda folder, *_: folder)
    monkeypatch.setattr(study, "train_and_evaluate", lambda *a: trained.append(a[:4]))
    setup = study.regime_setup(regime, tmp_path)
    # the base is that run's output, fine-tuned on the data it was trained on, judged against the same reference
    assert setup["base"] == tmp_path / "runs" / run_regime / f"{arm}-seed{seed}"
    assert {k: v for k, v in setup.items() if k != "base"} == {
        k: v for k, v in study.regime_setup(run_regime, tmp_path).items() if k != "base"}
    assert setup["train"].endswith("digits-5-9-few")
    assert trained[0] == (run_regime, arm, study._STUDY_ARMS[(run_regime, arm)][0], seed)
    # its base metrics get their own file, not the pre-trained base's
    assert study.base_name(regime) == f"{run_regime}-{arm}-seed{seed}" != study.base_name(run_regime)


def test_continue_on_a_subset_trains_on_that_many_images_per_class_and_is_judged_on_all(tmp_path, monkeypatch):
    import collections

    import datasets

    monkeypatch.setattr(study, "build_base", lambda name, work: work / "bases" / name)
    few, full = study.regime_setup("continue-24m-few", tmp_path), study.regime_setup("continue-24m", tmp_path)
    assert few["base"] == full["base"] and few["reference"] == full["reference"] == "builtin:digits"
    assert full["train"] == "builtin:digits" != few["train"]
    labels = datasets.load_dataset(few["train"], split="train")["label"]
    per_class = study.REGIMES["continue-24m-few"]["train_per_class"]
    assert collections.Counter(labels) == {c: per_class for c in range(10)}


def test_regimes_on_all_of_digits_5_to_9_train_and_judge_on_them_and_keep_their_own_base_metrics(tmp_path, monkeypatch):
    import collections

    import datasets
    import numpy as np

    from sadm_finetune.data.digits import load_digits_images

    monkeypatch.setattr(study, "build_base", lambda name, work: work / "bases" / name)
    full, seen, few = (study.regime_setup(r, tmp_path)
                       for r in ("transfer-24m-full", "continue-24m-5to9", "transfer-24m"))
    # transfer's base on all of 5-9; continue's base (pre-trained on all ten digits) on the same data and reference
    assert full["base"] == few["base"] and seen["base"] == study.regime_setup("continue-24m", tmp_path)["base"]
    assert full["train"] == full["reference"] == seen["train"] == seen["reference"] == few["reference"] != few["train"]
    _, labels = load_digits_images(32)
    counts = collections.Counter(datasets.load_dataset(full["train"], split="train")["label"])
    assert counts == {c: int(np.sum(labels == c)) for c in study.TRANSFER_CLASSES}
    # the continue-24m base judged on 5-9 (200 samples per digit) is not continue-24m's evaluation of it (0-9, 100)
    assert study.base_file("continue-24m-5to9", tmp_path) != study.base_file("continue-24m", tmp_path)
    assert study.base_file("transfer-24m-full", tmp_path) == study.base_file("transfer-24m", tmp_path)
    assert study.base_file("continue-24m-few", tmp_path) == study.base_file("continue-24m", tmp_path)
    # the second stage on all of 5-9 fine-tunes the 1,200-step plain run on them (trained first), on the same data
    trained = []
    monkeypatch.setattr(study, "train_and_evaluate", lambda *a: trained.append(a[:4]))
    stage = study.regime_setup("transfer-24m-full-stage2", tmp_path)
    assert trained == [("transfer-24m-full-long", "full-plain", study.PLAIN, 0)]
    assert stage["base"] == tmp_path / "runs" / "transfer-24m-full-long" / "full-plain-seed0"
    assert stage["train"] == stage["reference"] == full["train"]
    assert study.REGIMES["transfer-24m-full-long"]["base"] == "transfer-24m"


def test_a_fine_tuned_run_as_base_reuses_its_own_evaluation_instead_of_sampling_it_again(tmp_path, monkeypatch):
    import json

    regime = "transfer-24m-stage2"
    run_regime, arm, seed = study.REGIMES[regime]["base_run"]
    run = tmp_path / "runs" / run_regime / f"{arm}-seed{seed}"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"metrics": {m: 1.5 for m in study.METRICS}}))

    def sampled(*args, **kwargs):
        raise AssertionError("the base was sampled again")

    monkeypatch.setattr(sys.modules["harness"], "run_checked", sampled)  # what sadm_eval_once samples with
    metrics = study.base_metrics(regime, {"base": run, "train": "t", "reference": "r"}, tmp_path)
    assert metrics == {m: 1.5 for m in study.METRICS}
    assert json.loads(study.base_file(regime, tmp_path).read_text())["metrics"] == metrics
    # a pre-trained base (no eval.json of its own) is still evaluated
    base = tmp_path / "bases" / "transfer-24m"
    with pytest.raises(AssertionError, match="sampled again"):
        study.base_metrics("transfer-24m", {"base": base, "train": "t", "reference": "r"}, tmp_path)


def test_a_derived_base_redraws_the_label_rows_of_its_classes_and_copies_everything_else(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    weights = "transformer/diffusion_pytorch_model.safetensors"
    source = study.DEMO_BASE
    out = study.redraw_class_rows(source, tmp_path / "redrawn", (5, 6, 7, 8, 9), seed=1)
    before, after = load_file(source / weights), load_file(out / weights)
    tables = [k for k in before if k.endswith("class_embedder.embedding_table.weight")]
    assert tables and before.keys() == after.keys()
    for k in before:
        if k not in tables:
            assert torch.equal(before[k], after[k]), k
    for k in tables:
        assert torch.equal(before[k][:5], after[k][:5]) and torch.equal(before[k][10:], after[k][10:])
        moved = (after[k][5:10] - before[k][5:10]).norm(dim=1) / before[k][5:10].norm(dim=1)
        assert moved.min() > 1.0  # new vectors, not a nudge of the old ones (two N(0, 1) draws: about sqrt(2))
        assert 0.8 < after[k][5:10].std() < 1.2  # nn.Embedding's init
    # every other file is the source's, and the same seed gives the same rows
    files = [sorted(p.relative_to(folder) for p in folder.rglob("*")) for folder in (out, source)]
    assert files[0] == files[1]
    again = study.redraw_class_rows(source, tmp_path / "again", (5, 6, 7, 8, 9), seed=1)
    assert all(torch.equal(after[k], load_file(again / weights)[k]) for k in tables)
    assert not (tmp_path / "redrawn.tmp").exists()
    # the regime fine-tunes that base (built from continue-24m on first use), on all of 5-9, judged on them
    built = []
    monkeypatch.setattr(study, "redraw_class_rows", lambda src, dst, classes, seed: built.append((src, dst, classes)))
    monkeypatch.setattr(study, "_run", lambda cmd, what: None)
    setup = study.regime_setup("continue-24m-5to9-redrawn", tmp_path)
    assert built == [(tmp_path / "bases" / "continue-24m", tmp_path / "bases" / "continue-24m-5to9-redrawn",
                      study.TRANSFER_CLASSES)]
    assert setup["base"] == tmp_path / "bases" / "continue-24m-5to9-redrawn"
    assert setup["train"] == setup["reference"] == study.regime_setup("continue-24m-5to9", tmp_path)["train"]
    assert study.base_file("continue-24m-5to9-redrawn", tmp_path).name == "base-continue-24m-5to9-redrawn.json"


def _setup_and_base_flags(regime, base, tmp_path, monkeypatch):
    """A regime's setup in tmp_path, and the make_demo_base.py flags it builds its base with (the build recorded,
    not run); the base is the named one."""
    built = []
    monkeypatch.setattr(study, "_run", lambda cmd, what: built.append(cmd))
    setup = study.regime_setup(regime, tmp_path)
    assert setup["base"] == tmp_path / "bases" / base
    assert len(built) == 1
    return setup, built[0][built[0].index("--no_samples") + 1:]


def test_the_ema_base_regime_is_continue_on_5_to_9_with_transfer_s_base_recipe_on_all_ten_digits(tmp_path, monkeypatch):
    setup, flags = _setup_and_base_flags("continue-24m-ema-5to9", "continue-24m-ema", tmp_path, monkeypatch)
    transfer = study.BASES["transfer-24m"]
    classes = transfer.index("--classes")
    assert flags == transfer[:classes] + transfer[classes + 6:]  # transfer-24m's flags without "--classes 0 1 2 3 4"
    assert "--ema_decay" not in flags and "--lr_schedule" not in flags  # make_demo_base's EMA and cosine defaults
    assert setup["train"] == setup["reference"] == study.regime_setup("continue-24m-5to9", tmp_path)["train"]
    # its base has no namesake regime: judged here first, in its own file, not as continue-24m's base on 5-9
    assert study.base_file("continue-24m-ema-5to9", tmp_path).name == "base-continue-24m-ema.json"
    assert ("continue-24m-ema-5to9", "plain-equal-compute") in study.EVAL_NOISE_ARMS


def test_the_ema_constant_base_is_continue_24m_with_only_the_ema_added(tmp_path, monkeypatch):
    setup, flags = _setup_and_base_flags("continue-24m-ema-constant-5to9", "continue-24m-ema-constant", tmp_path,
                                         monkeypatch)
    raw = study.BASES["continue-24m"]
    ema = raw.index("--ema_decay")
    assert flags == raw[:ema] + raw[ema + 2:]  # continue-24m's flags without "--ema_decay 0": make_demo_base's EMA
    assert flags[flags.index("--lr_schedule") + 1] == "constant"
    assert setup["train"] == setup["reference"] == study.regime_setup("continue-24m-5to9", tmp_path)["train"]
    assert study.base_file("continue-24m-ema-constant-5to9", tmp_path).name == "base-continue-24m-ema-constant.json"
    arms = study.LENGTH_ARMS
    assert arms[("continue-24m-ema-constant-5to9", "plain-equal-compute")] == (
        study.PLAIN + ["--max_train_steps", "515"], "plain")
    assert study.ALSO_PAIRED[("continue-24m-ema-constant-5to9", "plain-equal-compute")] == "sadm"
    assert ("continue-24m-ema-constant-5to9", "sadm") in study.EVAL_NOISE_ARMS


def test_the_raw_transfer_base_is_transfer_24m_s_data_with_continue_24m_s_recipe(tmp_path, monkeypatch):
    setup, flags = _setup_and_base_flags("transfer-24m-raw-full", "transfer-24m-raw", tmp_path, monkeypatch)
    classes = flags.index("--classes")
    assert flags[classes:classes + 6] == ["--classes", "0", "1", "2", "3", "4"]  # pre-trained on 0-4 only
    assert flags[:classes] + flags[classes + 6:] == study.BASES["continue-24m"]  # constant LR, no EMA
    # fine-tuned and judged as transfer-24m-full: every image of digits 5-9, the same recipe and length
    full = study.regime_setup("transfer-24m-full", tmp_path)
    assert (setup["train"], setup["reference"]) == (full["train"], full["reference"])
    assert {k: v for k, v in study.REGIMES["transfer-24m-raw-full"].items() if k != "base"} == {
        k: v for k, v in study.REGIMES["transfer-24m-full"].items() if k != "base"}
    assert study.base_file("transfer-24m-raw-full", tmp_path).name == "base-transfer-24m-raw.json"
    assert study.LENGTH_ARMS[("transfer-24m-raw-full", "full-sadm")] == ([], "full-plain")
    assert study.ALSO_PAIRED[("transfer-24m-raw-full", "full-plain-equal-compute")] == "full-sadm"


def test_the_cosine_base_is_continue_24m_with_make_demo_base_s_decay_and_no_ema(tmp_path, monkeypatch):
    setup, flags = _setup_and_base_flags("continue-24m-cosine-5to9", "continue-24m-cosine", tmp_path, monkeypatch)
    raw = study.BASES["continue-24m"]
    schedule = raw.index("--lr_schedule")
    assert flags == raw[:schedule] + raw[schedule + 2:]  # continue-24m's flags without "--lr_schedule constant"
    assert flags[flags.index("--ema_decay") + 1] == "0"
    # ... and continue-24m-ema's flags with the EMA off: the same trajectory, its raw iterate
    ema = study.BASES["continue-24m-ema"]
    assert [f for f in flags if f not in ("--ema_decay", "0")] == ema
    assert {k: v for k, v in study.REGIMES["continue-24m-cosine-5to9"].items() if k != "base"} == {
        k: v for k, v in study.REGIMES["continue-24m-ema-5to9"].items() if k != "base"}
    assert setup["train"] == setup["reference"] == study.regime_setup("continue-24m-5to9", tmp_path)["train"]
    assert study.base_file("continue-24m-cosine-5to9", tmp_path).name == "base-continue-24m-cosine.json"
    assert study.ALSO_PAIRED[("continue-24m-cosine-5to9", "plain-equal-compute")] == "sadm"
    assert ("continue-24m-cosine-5to9", "plain-equal-compute") in study.EVAL_NOISE_ARMS


def test_an_offset_base_scales_every_float_tensor_s_offset_from_its_centre(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    weights = study.TRANSFORMER_WEIGHTS
    centre = study.DEMO_BASE
    point = study.redraw_class_rows(centre, tmp_path / "point", (5, 6, 7, 8, 9), seed=1)  # differs in 5 rows only
    out = study.offset_base(centre, point, -1.0, tmp_path / "mirrored")
    c, p, m = (load_file(folder / weights) for folder in (centre, point, out))
    assert m.keys() == c.keys()
    moved = 0
    for k in c:
        assert m[k].dtype == c[k].dtype
        if c[k].is_floating_point():
            assert torch.allclose(m[k] - c[k], c[k] - p[k], atol=1e-6), k  # the same step, the other way
            moved += int(not torch.equal(m[k], c[k]))
        else:
            assert torch.equal(m[k], c[k]), k
    assert moved > 0
    assert study.weight_gap(out, centre) == pytest.approx(study.weight_gap(point, centre), rel=1e-6)
    assert study.weight_gap(out, point) == pytest.approx(2 * study.weight_gap(centre, point), rel=1e-5)
    # reflected back, the point again; every other file is the centre's; nothing left half-written
    back = load_file(study.offset_base(centre, out, -1.0, tmp_path / "back") / weights)
    assert all(torch.allclose(back[k], p[k], atol=1e-5) for k in p)
    files = [sorted(q.relative_to(folder) for q in folder.rglob("*")) for folder in (out, centre)]
    assert files[0] == files[1] and not (tmp_path / "mirrored.tmp").exists()
    # two architectures cannot be reflected through each other
    other = tmp_path / "other"
    other.joinpath("transformer").mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v for k, v in list(p.items())[1:]}, str(other / weights))
    with pytest.raises(ValueError, match="differ in their tensors"):
        study.offset_base(centre, other, -1.0, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # any point on the line: half the offset lies halfway, at half the distance
    half = load_file(study.offset_base(centre, point, 0.5, tmp_path / "half") / weights)
    assert all(torch.allclose(half[k], (c[k] + p[k]) / 2, atol=1e-6) for k in c if c[k].is_floating_point())
    assert study.weight_gap(tmp_path / "half", centre) == pytest.approx(study.weight_gap(point, centre) / 2, rel=1e-5)


def test_the_offset_regimes_move_continue_24m_along_its_offset_from_its_own_ema(tmp_path, monkeypatch):
    built, mirrored = [], []
    monkeypatch.setattr(study, "_run", lambda cmd, what: built.append(cmd[cmd.index("--output_dir") + 1]))
    monkeypatch.setattr(study, "offset_base",
                        lambda centre, point, scale, out: mirrored.append((centre, point, scale, out)))
    setup = study.regime_setup("continue-24m-mirrored-5to9", tmp_path)
    bases = tmp_path / "bases"
    assert mirrored == [(bases / "continue-24m-ema-constant", bases / "continue-24m", -1.0,
                         bases / "continue-24m-mirrored")]
    assert sorted(built) == [str(bases / "continue-24m"), str(bases / "continue-24m-ema-constant")]
    # the centre is the point's EMA: the two bases' flags differ in "--ema_decay 0" only (one trajectory)
    raw, ema = study.BASES["continue-24m"], study.BASES["continue-24m-ema-constant"]
    assert [f for f in raw if f not in ("--ema_decay", "0")] == ema
    assert setup["train"] == setup["reference"] == study.regime_setup("continue-24m-5to9", tmp_path)["train"]
    assert study.base_file("continue-24m-mirrored-5to9", tmp_path).name == "base-continue-24m-mirrored.json"
    assert study.LENGTH_ARMS[("continue-24m-mirrored-5to9", "sadm")] == ([], "plain")
    # the dose-response: half the offset on the iterate's side, the same data and arms
    mirrored.clear()
    half = study.regime_setup("continue-24m-half-offset-5to9", tmp_path)
    assert mirrored == [(bases / "continue-24m-ema-constant", bases / "continue-24m", 0.5,
                         bases / "continue-24m-half-offset")]
    assert half["train"] == setup["train"] and half["reference"] == setup["reference"]
    assert {k: v for k, v in study.REGIMES["continue-24m-half-offset-5to9"].items() if k != "base"} == {
        k: v for k, v in study.REGIMES["continue-24m-mirrored-5to9"].items() if k != "base"}
    assert study.ALSO_PAIRED[("continue-24m-half-offset-5to9", "plain-equal-compute")] == "sadm"
    assert ("continue-24m-half-offset-5to9", "sadm") in study.EVAL_NOISE_ARMS
    # and twice it, past the iterate
    mirrored.clear()
    double = study.regime_setup("continue-24m-double-offset-5to9", tmp_path)
    assert mirrored == [(bases / "continue-24m-ema-constant", bases / "continue-24m", 2.0,
                         bases / "continue-24m-double-offset")]
    assert double["train"] == setup["train"] and double["reference"] == setup["reference"]
    assert study.LENGTH_ARMS[("continue-24m-double-offset-5to9", "plain-equal-compute")] == (
        study.PLAIN + ["--max_train_steps", "515"], "plain")
    assert ("continue-24m-double-offset-5to9", "plain-equal-compute") in study.EVAL_NOISE_ARMS
    # --weight_gaps measures each offset base's distance from the average it was built around
    for name in study.OFFSET_BASES:
        assert (name, study.OFFSET_BASES[name][0]) in study.WEIGHT_GAP_PAIRS


def test_the_raw_second_stage_continues_the_raw_iterate_of_the_averaged_stage_s_trajectory(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "build_base", lambda name, work: work / "bases" / name)
    trained = []
    monkeypatch.setattr(study, "train_and_evaluate", lambda *a: trained.append(a[:4]))
    raw, averaged = study.regime_setup("transfer-24m-full-raw-stage2", tmp_path), \
        study.regime_setup("transfer-24m-full-stage2", tmp_path)
    assert trained == [("transfer-24m-full-long-raw", "full-plain", study.PLAIN, 0),
                       ("transfer-24m-full-long", "full-plain", study.PLAIN, 0)]
    assert raw["base"] == tmp_path / "runs" / "transfer-24m-full-long-raw" / "full-plain-seed0"
    assert raw["train"] == averaged["train"] and raw["reference"] == averaged["reference"]
    # the first stages differ in the EMA only: the same base, data, length and LR schedule
    first_raw, first_avg = study.REGIMES["transfer-24m-full-long-raw"], study.REGIMES["transfer-24m-full-long"]
    assert ({k: v for k, v in first_raw.items() if k != "recipe"} ==
            {k: v for k, v in first_avg.items() if k != "recipe"})
    # as the study's runs resolve them (the demo recipe under the flags): EMA off in the raw stage (it is on by
    # default), on in the averaged one, and the same LR schedule
    from harness import DEMO_RECIPE

    from sadm_finetune.cli import parse_config

    raw_run, avg_run = (parse_config(["--config", str(DEMO_RECIPE), "--pretrained", "base", "--dataset_name", "data",
                                      *r["recipe"], *study.PLAIN])[0].training for r in (first_raw, first_avg))
    assert raw_run.use_ema is False and avg_run.use_ema is True and avg_run.ema_decay == 0.999
    assert (raw_run.lr_scheduler, raw_run.lr_warmup_steps) == (avg_run.lr_scheduler, avg_run.lr_warmup_steps) == (
        "constant_with_warmup", 50)
    # the second stages differ in their base only
    assert {k: v for k, v in study.REGIMES["transfer-24m-full-raw-stage2"].items() if k != "base_run"} == {
        k: v for k, v in study.REGIMES["transfer-24m-full-stage2"].items() if k != "base_run"}
    assert study.base_name("transfer-24m-full-raw-stage2") == "transfer-24m-full-long-raw-full-plain-seed0"
    assert study.ALSO_PAIRED[("transfer-24m-full-raw-stage2", "full-plain-equal-compute")] == "full-sadm"
    # the first stage at the base builds' LR: the raw stage's flags and 1e-3, and the same second stage on it
    hot = study.REGIMES["transfer-24m-full-long-raw-lr1e-3"]
    assert hot == {**first_raw, "recipe": first_raw["recipe"] + ["--learning_rate", "1e-3"]}
    hot_run = parse_config(["--config", str(DEMO_RECIPE), "--pretrained", "base", "--dataset_name", "data",
                            *hot["recipe"], *study.PLAIN])[0].training
    assert hot_run.use_ema is False and hot_run.learning_rate == 1e-3 and raw_run.learning_rate == 1e-4
    trained.clear()
    hot_stage = study.regime_setup("transfer-24m-full-raw-lr1e-3-stage2", tmp_path)
    assert trained == [("transfer-24m-full-long-raw-lr1e-3", "full-plain", study.PLAIN, 0)]
    assert hot_stage["train"] == raw["train"] and hot_stage["reference"] == raw["reference"]
    assert {k: v for k, v in study.REGIMES["transfer-24m-full-raw-lr1e-3-stage2"].items() if k != "base_run"} == {
        k: v for k, v in study.REGIMES["transfer-24m-full-stage2"].items() if k != "base_run"}
    assert ("transfer-24m-full-raw-lr1e-3-stage2", "full-sadm") in study.EVAL_NOISE_ARMS
    # its EMA'd twin: the same run with the EMA on
    twin = study.REGIMES["transfer-24m-full-long-lr1e-3"]
    assert twin == {**hot, "recipe": ["--use_ema", "--ema_decay", "0.999", *first_raw["recipe"][1:],
                                      "--learning_rate", "1e-3"]}
    assert study.LENGTH_ARMS[("transfer-24m-full-long-lr1e-3", "full-plain")] == (study.PLAIN, None)


def test_weight_gaps_reports_each_pair_of_built_bases_and_refuses_a_missing_one(tmp_path, monkeypatch, capsys):
    import json

    bases = tmp_path / "bases"
    point = study.redraw_class_rows(study.DEMO_BASE, bases / "point", (5, 6, 7, 8, 9), seed=1)
    study.offset_base(study.DEMO_BASE, point, -1.0, bases / "mirrored")
    (bases / "centre").symlink_to(study.DEMO_BASE)
    monkeypatch.setattr(study, "WEIGHT_GAP_PAIRS", (("point", "centre"), ("mirrored", "centre"), ("centre", "centre")))
    out = tmp_path / "gaps"
    monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--weight_gaps", "--work_dir", str(tmp_path),
                                      "--output", str(out)])
    study.main()
    gaps = json.loads(out.with_suffix(".json").read_text())
    assert [(g["a"], g["b"]) for g in gaps] == [("point", "centre"), ("mirrored", "centre"), ("centre", "centre")]
    assert gaps[0]["gap"] > 0.01 and gaps[1]["gap"] == pytest.approx(gaps[0]["gap"], rel=1e-6) and gaps[2]["gap"] == 0
    assert f"{100 * gaps[0]['gap']:.2f}%" in capsys.readouterr().out
    # a fine-tuned run that a regime starts from is read from runs/, under the regime's name for it
    run = tmp_path / "runs" / "transfer-24m-full-long" / "full-plain-seed0"
    run.parent.mkdir(parents=True)
    run.symlink_to(point)
    assert study.base_folder("transfer-24m-full-long-full-plain-seed0", tmp_path) == run
    assert study.base_folder("transfer-24m-full-long-raw-full-plain-seed0", tmp_path) == (
        tmp_path / "runs" / "transfer-24m-full-long-raw" / "full-plain-seed0")
    # any study run, also one no regime starts from (the EMA'd twin of the 1e-3 first stage); a base stays a base
    assert study.base_folder("transfer-24m-full-long-lr1e-3-full-plain-seed0", tmp_path) == (
        tmp_path / "runs" / "transfer-24m-full-long-lr1e-3" / "full-plain-seed0")
    assert study.base_folder("continue-24m-sadm-seed3", tmp_path) == tmp_path / "runs" / "continue-24m" / "sadm-seed3"
    assert study.base_folder("continue-24m-ema", tmp_path) == tmp_path / "bases" / "continue-24m-ema"
    monkeypatch.setattr(study, "WEIGHT_GAP_PAIRS", (("transfer-24m-full-long-full-plain-seed0", "centre"),))
    study.main()
    assert json.loads(out.with_suffix(".json").read_text())[0]["gap"] == pytest.approx(gaps[0]["gap"], rel=1e-6)
    # a base not built: a one-line refusal naming it, and no file written
    monkeypatch.setattr(study, "WEIGHT_GAP_PAIRS", (("point", "centre"), ("continue-24m-cosine", "centre")))
    monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--weight_gaps", "--work_dir", str(tmp_path),
                                      "--output", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"\['continue-24m-cosine'\] are not built"):
        study.main()
    assert not (tmp_path / "none.json").exists()


def test_the_two_stage_pipeline_at_the_smaller_sizes_is_the_23m_one_on_their_own_transfer_bases(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "build_base", lambda name, work: work / "bases" / name)
    trained = []
    monkeypatch.setattr(study, "train_and_evaluate", lambda *a: trained.append(a[:4]))
    big = study.regime_setup("transfer-24m-full-raw-lr1e-3-stage2", tmp_path)
    for size, base, equal_steps in (("", "transfer", study.EQUAL_COMPUTE_STEPS), ("-6m", "transfer-6m", 543)):
        first, twin, stage = (f"transfer{size}-full-long-raw-lr1e-3", f"transfer{size}-full-long-lr1e-3",
                              f"transfer{size}-full-raw-lr1e-3-stage2")
        # the first stages: the 23.1 M ones (raw at 1e-3, and its EMA'd twin) on the size's own transfer base
        assert study.REGIMES[first] == {**study.REGIMES["transfer-24m-full-long-raw-lr1e-3"], "base": base}
        assert study.REGIMES[twin] == {**study.REGIMES["transfer-24m-full-long-lr1e-3"], "base": base}
        assert study.LENGTH_ARMS[(first, "full-plain")] == study.LENGTH_ARMS[(twin, "full-plain")] == (study.PLAIN, None)
        # the second stage: the 23.1 M one on that first stage's plain run, trained first, on the same data
        assert study.REGIMES[stage] == {**study.REGIMES["transfer-24m-full-raw-lr1e-3-stage2"],
                                        "base_run": [first, "full-plain", 0]}
        trained.clear()
        setup = study.regime_setup(stage, tmp_path)
        assert trained == [(first, "full-plain", study.PLAIN, 0)]
        assert setup["base"] == tmp_path / "runs" / first / "full-plain-seed0"
        assert (setup["train"], setup["reference"]) == (big["train"], big["reference"])
        assert setup["train"].endswith("digits-5-9-all")
        # plain at SADM's compute at that size (x1.39 at 1.9 M, x1.085 at 6.4 M), paired with SADM too
        flags, paired = study.LENGTH_ARMS[(stage, "full-plain-equal-compute")]
        assert flags == study.PLAIN + ["--max_train_steps", str(equal_steps)] and paired == "full-plain"
        assert study.ALSO_PAIRED[(stage, "full-plain-equal-compute")] == "full-sadm"
        assert set(study.equal_compute_trio(stage)) <= set(study.EVAL_NOISE_ARMS)
        assert study.root_base(stage) == base and study.root_base(first) == base
    # the 23.1 M tie's pipeline at 6.4 M: the raw first stage at 1e-4 (and its EMA'd twin), and the same second stage
    for name in ("transfer-24m-full-long-raw", "transfer-24m-full-long"):
        assert study.REGIMES[name.replace("24m", "6m")] == {**study.REGIMES[name], "base": "transfer-6m"}
    assert study.REGIMES["transfer-6m-full-raw-stage2"] == {**study.REGIMES["transfer-24m-full-raw-stage2"],
                                                            "base_run": ["transfer-6m-full-long-raw", "full-plain", 0]}
    assert study.LENGTH_ARMS[("transfer-6m-full-raw-stage2", "full-plain-equal-compute")][0][-1] == "543"
    assert set(study.equal_compute_trio("transfer-6m-full-raw-stage2")) <= set(study.EVAL_NOISE_ARMS)
    # at 1.9 M also at the toolkit loop's measured x1.21 (the x1.39 above is the mechanism study's older ratio)
    assert study.LENGTH_ARMS[("transfer-full-raw-lr1e-3-stage2", "full-plain-equal-compute-1.21")] == (
        study.PLAIN + ["--max_train_steps", "605"], "full-plain")
    assert study.ALSO_PAIRED[("transfer-full-raw-lr1e-3-stage2", "full-plain-equal-compute-1.21")] == "full-sadm"
    assert [study.SCALE_SERIES["transfer-stage2"][0][i] for i in (0, 1, 2)] == [
        "transfer-full-raw-lr1e-3-stage2", "transfer-6m-full-raw-lr1e-3-stage2", "transfer-24m-full-raw-lr1e-3-stage2"]


def test_each_regime_s_model_size_is_the_parameter_count_the_step_time_benchmark_measured():
    import json

    measured = {}
    for run in json.loads((ROOT / "benchmarks" / "results" / "step_time_scale.json").read_text())["runs"]:
        measured[run["model"]] = run["denoiser_params"]
    assert measured == {"tiny": 1936800, "tiny-6m": 6429472, "tiny-24m": 23082528}
    # a base, a second stage (through its first stage), a derived and an offset base resolve to their root's size
    for regime, model in (("transfer", "tiny"), ("continue-6m", "tiny-6m"), ("transfer-24m-full-stage2", "tiny-24m"),
                          ("transfer-6m-full-raw-lr1e-3-stage2", "tiny-6m"), ("continue-24m-5to9-redrawn", "tiny-24m"),
                          ("continue-24m-mirrored-5to9", "tiny-24m"), ("transfer-full-raw-lr1e-3-stage2", "tiny")):
        assert study.denoiser_parameters(regime) == measured[model], regime
    assert study.root_base("continue-24m-mirrored-5to9") == "continue-24m"
    assert study.root_base("continue-24m-5to9-redrawn") == "continue-24m"


def _stage2_summary(plain: float, sadm: float, equal: float) -> dict:
    """A report's summary entry for one second-stage regime: plain's mean FID and the two arms' paired differences
    (SADM - plain, plain at equal compute - plain, and that arm - SADM)."""
    def ci(d: float) -> dict:
        return {"mean": d, "low": d - 0.01, "high": d + 0.01, "n": 5}

    return {"full-plain": {"mean": {"fid": plain}},
            "full-sadm": {"mean": {"fid": plain + sadm}, "paired": {"fid": ci(sadm)}},
            "full-plain-equal-compute": {"mean": {"fid": plain + equal}, "paired": {"fid": ci(equal)},
                                         "also_paired": {"full-sadm": {"fid": ci(equal - sadm)}}}}


def test_scale_from_reports_plots_each_size_s_paired_differences_from_finished_reports(tmp_path, monkeypatch, capsys):
    import json

    reports = []
    for i, (regime, numbers) in enumerate((("transfer-full-raw-lr1e-3-stage2", (2.0, -0.1, -0.3)),
                                           ("transfer-24m-full-raw-lr1e-3-stage2", (0.8, -0.12, -0.01)))):
        reports.append(tmp_path / f"report{i}.json")
        reports[-1].write_text(json.dumps({"summary": {regime: _stage2_summary(*numbers)}}))
    out = tmp_path / "scale"
    monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--scale_from", *map(str, reports), "--output", str(out)])
    study.main()
    result = json.loads(out.with_suffix(".json").read_text())
    png = out.with_suffix(".png")
    if importlib.util.find_spec("matplotlib"):  # a plot where matplotlib is installed, the points without it
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    else:
        assert not png.exists()
    assert result["sources"] == [str(p) for p in reports] and "--scale_from" in result["command"]
    points = {(p["parameters"], p["arm"]): p for p in result["scale"]}
    assert {p["series"] for p in result["scale"]} == {"transfer-stage2"}
    assert set(points) == {(n, arm) for n in (1936800, 23082528)
                           for arm in ("sadm", "plain-equal-compute", "sadm vs plain-equal-compute")}
    small, big = points[(1936800, "sadm vs plain-equal-compute")], points[(23082528, "sadm vs plain-equal-compute")]
    # SADM - plain at equal compute = -(plain_equal - SADM), relative to plain-at-equal-compute's own FID
    assert small["dfid"] == pytest.approx(0.2) and small["relative"] == pytest.approx(0.2 / 1.7)
    assert (small["low"], small["high"]) == pytest.approx((0.19, 0.21))
    assert big["dfid"] == pytest.approx(-0.11) and big["relative"] == pytest.approx(-0.11 / 0.79)
    assert points[(23082528, "sadm")]["relative"] == pytest.approx(-0.12 / 0.8)
    assert "23.1 M sadm vs plain-equal-compute" in capsys.readouterr().out.replace("  ", " ")


def test_scale_from_refuses_missing_conflicting_or_unrelated_reports_before_writing(tmp_path, monkeypatch):
    import json

    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other.json"
    a.write_text(json.dumps({"summary": {"transfer-6m-full-raw-lr1e-3-stage2": _stage2_summary(1.0, -0.1, 0.0)}}))
    b.write_text(json.dumps({"summary": {"transfer-6m-full-raw-lr1e-3-stage2": _stage2_summary(1.0, -0.2, 0.0)}}))
    other.write_text(json.dumps({"summary": {"continue-24m-few": _stage2_summary(1.0, -0.2, 0.0)}}))
    out = tmp_path / "scale"
    for argv, message in (([str(a), str(tmp_path / "gone.json")], r"--scale_from: no report at .*gone\.json"),
                          ([str(a), str(b)], "--scale_from: transfer-6m-full-raw-lr1e-3-stage2 differs between"),
                          ([str(other)], "--scale_from: no regime of SCALE_SERIES with a plain arm")):
        monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--scale_from", *argv, "--output", str(out)])
        with pytest.raises(SystemExit, match=message):
            study.main()
    monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--scale_from", str(a)])
    with pytest.raises(SystemExit, match="--scale_from: pass --output"):
        study.main()
    # a dot in the name would be cut off by the suffixes (scale_1.9m -> scale_1.json): refused, as in every mode
    for argv in (["--scale_from", str(a)], ["--weight_gaps"], ["--length", "--report_only"]):
        monkeypatch.setattr(sys, "argv", ["sadm_study.py", *argv, "--work_dir", str(tmp_path / "w"),
                                          "--output", str(tmp_path / "scale_1.9m")])
        with pytest.raises(SystemExit, match=r"--output: .*scale_1\.9m' has a dot in its name.* e\.g\. scale_1$"):
            study.main()
    assert not list(tmp_path.glob("scale_1*"))
    assert not out.with_suffix(".json").exists() and not out.with_suffix(".png").exists()
    # the same regime in two reports with the same numbers is one regime
    monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--scale_from", str(a), str(a), "--output", str(out)])
    study.main()
    assert {p["parameters"] for p in json.loads(out.with_suffix(".json").read_text())["scale"]} == {6429472}


def test_weight_gaps_takes_the_pairs_named_on_the_command_line_and_refuses_malformed_ones(tmp_path, monkeypatch):
    import json

    bases = tmp_path / "bases"
    point = study.redraw_class_rows(study.DEMO_BASE, bases / "point", (5, 6, 7, 8, 9), seed=1)
    (bases / "centre").symlink_to(study.DEMO_BASE)
    run = tmp_path / "runs" / "transfer-6m-full-long-lr1e-3" / "full-plain-seed0"
    run.parent.mkdir(parents=True)
    run.symlink_to(point)
    out = tmp_path / "gaps"
    argv = ["sadm_study.py", "--weight_gaps", "--work_dir", str(tmp_path), "--output", str(out), "--pairs"]
    monkeypatch.setattr(sys, "argv", argv + ["transfer-6m-full-long-lr1e-3-full-plain-seed0:centre", "centre:point"])
    study.main()
    gaps = json.loads(out.with_suffix(".json").read_text())
    assert [(g["a"], g["b"]) for g in gaps] == [("transfer-6m-full-long-lr1e-3-full-plain-seed0", "centre"),
                                                ("centre", "point")]
    assert gaps[0]["gap"] == pytest.approx(study.weight_gap(point, study.DEMO_BASE)) and gaps[0]["gap"] > 0.01
    assert gaps[1]["gap"] == pytest.approx(study.weight_gap(study.DEMO_BASE, point))
    for pairs, message in ((["centre"], r"--pairs: \['centre'\] are not A:B"),
                           (["centre:"], r"--pairs: \['centre:'\] are not A:B"),
                           (["a:b:c"], r"--pairs: \['a:b:c'\] are not A:B")):
        monkeypatch.setattr(sys, "argv", argv + pairs)
        with pytest.raises(SystemExit, match=message):
            study.main()
    monkeypatch.setattr(study, "regime_setup", lambda *a: pytest.fail("--pairs without --weight_gaps went on to train"))
    monkeypatch.setattr(sys, "argv", ["sadm_study.py", "--pairs", "centre:point", "--work_dir", str(tmp_path / "w"),
                                      "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--pairs: only with --weight_gaps"):
        study.main()
    assert not (tmp_path / "x.json").exists()


def test_the_recommended_combination_runs_in_the_6_4m_two_stage_pipeline_against_plain_at_its_own_compute(tmp_path):
    import json

    stage = "transfer-6m-full-raw-lr1e-3-stage2"
    assert study.LENGTH_ARMS[(stage, "full-sadm+sddit-0.5")] == (study.SDDIT_05, "full-plain")
    # SD-DiT alone: the same term with SADM switched off, for SADM's share of the combination
    assert study.LENGTH_ARMS[(stage, "full-sddit-0.5")] == (study.SDDIT_05 + study.PLAIN, "full-plain")
    assert study.SDDIT_05[:2] == ["--sddit_weight", "0.5"] and "--structure_weight" not in study.SDDIT_05
    # plain gets 500 steps x the combination's measured step-time ratio at 6.4 M (x1.281: 641 steps), and 500 x SD-DiT
    # alone's (x1.165: 583 steps) against that; each ratio is checked against its JSON below
    assert study.LENGTH_ARMS[(stage, "full-plain-equal-compute-1.28")][0][-1] == "641"
    assert study.LENGTH_ARMS[(stage, "full-plain-equal-compute-1.17")][0][-1] == "583"
    assert study.ALSO_PAIRED[(stage, "full-plain-equal-compute-1.28")] == "full-sadm+sddit-0.5"
    assert study.ALSO_PAIRED[(stage, "full-plain-equal-compute-1.17")] == "full-sddit-0.5"
    assert study.ALSO_PAIRED[(stage, "full-sadm+sddit-0.5")] == "full-sddit-0.5"
    # on every draw the combination is set against plain at its compute, not at SADM alone's
    for arm, fid in (("full-plain", 1.2), ("full-sadm+sddit-0.5", 1.0), ("full-plain-equal-compute-1.28", 1.1),
                     ("full-sddit-0.5", 1.15), ("full-sadm", 1.05), ("full-plain-equal-compute", 1.19)):
        for seed in (0, 1):
            out = tmp_path / "runs" / stage / f"{arm}-seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"metrics": {"fid": fid + 0.01 * seed}}))
    result = study.eval_noise_result(tmp_path, [0, 1])
    combo = result["equal_compute"][f"{stage}/full-sadm+sddit-0.5 - full-plain-equal-compute-1.28"]["ddim25-s1234"]
    assert combo["n"] == 2 and combo["mean"] == pytest.approx(-0.1) and combo["relative_to"] == pytest.approx(1.105)
    alone = result["equal_compute"][f"{stage}/full-sadm - full-plain-equal-compute"]["ddim25-s1234"]
    assert alone["mean"] == pytest.approx(-0.14)
    assert result["paired_vs_plain"][f"{stage}/full-sddit-0.5"]["ddim25-s1234"]["mean"] == pytest.approx(-0.05)



def test_the_lazy_combination_of_the_6_4m_second_stage_meets_plain_at_its_own_measured_compute(tmp_path):
    import json

    stage, arm = "transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5-every4"
    # the combination's flags with SD-DiT on one update in four (at 4 x lambda), SADM on
    assert study.LENGTH_ARMS[(stage, arm)] == (study.SDDIT_05 + ["--sddit_every", "4"], "full-plain")
    # its equal compute: the lazy combination's measured mean step-time ratio is within a step of SD-DiT alone's, so
    # plain at 583 steps (SD-DiT alone's arm) is paired with it, and stays SD-DiT alone's own pairing
    terms = json.loads((ROOT / "benchmarks" / "results" / "step_time_terms_6m_lazy.json").read_text())
    measured = terms["summary"]["tiny-6m"]["ratios"]["sadm+sddit-every4/plain"]["time_mean"]
    assert study.LAZY_COMBINATION_RATIO["6m"] == pytest.approx(measured, abs=5e-4)  # the constant is the measurement
    equal = "full-plain-equal-compute-1.17"
    steps = int(study.LENGTH_ARMS[(stage, equal)][0][-1])
    assert steps == 583 and abs(500 * measured - steps) <= 1
    assert study.ALSO_PAIRED[(stage, arm)] == equal and study.ALSO_PAIRED[(stage, equal)] == "full-sddit-0.5"
    assert study.ALSO_PAIRED[(stage, "full-plain-equal-compute-1.28")] == "full-sadm+sddit-0.5"  # unchanged
    assert {(stage, arm), (stage, equal)} <= set(study.EVAL_NOISE_ARMS)
    for name, fid in (("full-plain", 1.2), (arm, 1.0), (equal, 1.1)):
        for seed in (0, 1):
            out = tmp_path / "runs" / stage / f"{name}-seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"metrics": {"fid": fid + 0.01 * seed * (name == arm)}}))
            (out / "eval-ddpm50-s1234.json").write_text(json.dumps({"metrics": {"fid": fid / 2}}))
    pairs = study.eval_noise_result(tmp_path, [0, 1])["equal_compute"][f"{stage}/{arm} - {equal}"]
    assert pairs["ddim25-s1234"]["n"] == 2 and pairs["ddim25-s1234"]["mean"] == pytest.approx(-0.095)
    assert pairs["ddpm50-s1234"]["mean"] == pytest.approx(-0.05)
    assert pairs["ddpm50-s1234"]["relative_to"] == pytest.approx(0.55)


_COMBINATION = (study.SDDIT_05, "sadm+sddit", study.COMBINATION_RATIO)
_SDDIT_ALONE = (study.SDDIT_05 + study.PLAIN, "sddit", study.SDDIT_RATIO)


@pytest.mark.parametrize("size, regime, arm, prefix, term", [
    ("6m", "continue-6m", "sadm+sddit-0.5", "", _COMBINATION),
    ("24m", "continue-24m", "sadm+sddit-0.5", "", _COMBINATION),
    ("24m", "transfer-24m", "full-sadm+sddit-0.5", "full-", _COMBINATION),
    ("24m", "transfer-24m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5", "full-", _COMBINATION),
    ("6m", "transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5", "full-", _COMBINATION),
    ("6m", "transfer-6m-full-raw-lr1e-3-stage2", "full-sddit-0.5", "full-", _SDDIT_ALONE),
    ("24m", "transfer-24m-full-raw-lr1e-3-stage2", "full-sddit-0.5", "full-", _SDDIT_ALONE)])
def test_each_arm_at_its_compute_meets_plain_at_the_step_time_its_size_measured(size, regime, arm, prefix, term):
    import json

    flags, column, ratios = term
    terms = json.loads((ROOT / "benchmarks" / "results" / f"step_time_terms_{size}.json").read_text())
    ratio = terms["summary"][f"tiny-{size}"]["ratios"][f"{column}/plain"]["time"]
    assert ratios[size] == pytest.approx(ratio, abs=5e-5)  # the constant is the measurement
    assert study._STUDY_ARMS[(regime, arm)] == (flags, f"{prefix}plain")
    equal = f"{prefix}plain-equal-compute-{ratio:.2f}"
    steps = round(study.REGIMES[regime]["steps"] * ratio)
    assert study._STUDY_ARMS[(regime, equal)] == (study.PLAIN + ["--max_train_steps", str(steps)], f"{prefix}plain")
    # paired with plain (its table) and with the arm whose compute it was given
    assert study.ALSO_PAIRED[(regime, equal)] == arm
    if term is _SDDIT_ALONE:  # and the combination of the same regime with it (SADM's share)
        assert study.ALSO_PAIRED[(regime, arm.replace("sddit", "sadm+sddit"))] == arm


def test_at_its_compute_names_steps_and_pairs_plain_by_the_measured_ratio(monkeypatch):
    monkeypatch.setattr(study, "AT_ITS_COMPUTE", {})
    arms = study.at_its_compute("transfer-24m", "full-x", ["--flag"], 1.2078)
    # 400 steps x 1.2078 = 483.1: plain gets 483, named by the ratio to two places
    assert arms == {("transfer-24m", "full-x"): (["--flag"], "full-plain"),
                    ("transfer-24m", "full-plain-equal-compute-1.21"):
                        (study.PLAIN + ["--max_train_steps", "483"], "full-plain")}
    assert study.AT_ITS_COMPUTE == {("transfer-24m", "full-plain-equal-compute-1.21"): "full-x"}
    arms = study.at_its_compute("continue-24m", "y", [], 1.1652, prefix="")
    assert arms[("continue-24m", "plain-equal-compute-1.17")][0][-1] == "583"  # 500 x 1.1652 = 582.6


def test_continue_s_combination_meets_plain_at_the_terms_study_s_rounded_ratio():
    # step_time_terms.json measured x1.459 at 1.9 M; the arm keeps the terms study's rounded x1.46: 730 steps
    assert study.MECHANISM_ARMS[("continue", "sadm+sddit-0.5")] == (study.SDDIT_05, "plain")
    assert study.MECHANISM_ARMS[("continue", "plain-equal-compute-1.46")] == (
        study.PLAIN + ["--max_train_steps", "730"], "plain")
    assert study.ALSO_PAIRED[("continue", "plain-equal-compute-1.46")] == "sadm+sddit-0.5"


def test_the_noise_band_combinations_split_sddit_at_t_500_and_meet_the_full_combinations_plain():
    stage = "transfer-6m-full-raw-lr1e-3-stage2"
    low, high = "full-sadm+sddit-0.5-low-t", "full-sadm+sddit-0.5-high-t"
    # the full combination's flags with SD-DiT's loss on t < 500, and on t >= 500: the two halves of the full term
    assert study.LENGTH_ARMS[(stage, low)] == (study.SDDIT_05 + ["--sddit_t_max", "500"], "full-plain")
    assert study.LENGTH_ARMS[(stage, high)] == (study.SDDIT_05 + ["--sddit_t_min", "500"], "full-plain")
    # the band masks the loss, not the compute: both pair with the full combination's plain (641 steps)
    equal = "full-plain-equal-compute-1.28"
    assert int(study.LENGTH_ARMS[(stage, equal)][0][-1]) == round(500 * study.COMBINATION_RATIO["6m"]) == 641
    assert study.ALSO_PAIRED[(stage, low)] == study.ALSO_PAIRED[(stage, high)] == equal
    assert {(stage, low), (stage, high)} <= set(study.EVAL_NOISE_ARMS)
    # and each half at lambda 1.0: the full term's push over the batch, on one half of the noise levels
    for band, flags in (("low-t", ["--sddit_t_max", "500"]), ("high-t", ["--sddit_t_min", "500"])):
        arm = f"full-sadm+sddit-1.0-{band}"
        assert study.LENGTH_ARMS[(stage, arm)][0] == ["--sddit_weight", "1.0", *study.SDDIT_05[2:], *flags]
        assert study.ALSO_PAIRED[(stage, arm)] == equal and (stage, arm) in study.EVAL_NOISE_ARMS


def test_sadm_s_dose_arms_raise_only_lambda_and_meet_the_plain_arm_of_their_lambda_0_01_twin():
    stage = "transfer-6m-full-raw-lr1e-3-stage2"
    combination = study.LENGTH_ARMS[(stage, "full-sadm+sddit-0.5")][0]
    assert study.LENGTH_ARMS[(stage, "full-sadm")][0] == []  # SADM alone is the default: no flags
    # each arm is its lambda-0.01 twin's flags with lambda raised, and nothing else
    expected = {"full-sadm-lambda-0.02": (["--structure_weight", "0.02"], "full-plain-equal-compute"),
                "full-sadm-lambda-0.04": (["--structure_weight", "0.04"], "full-plain-equal-compute"),
                "full-sadm-lambda-0.02+sddit-0.5": (["--structure_weight", "0.02", *combination],
                                                    "full-plain-equal-compute-1.28")}
    assert set(study.SADM_DOSE_ARMS) == set(expected)
    for arm, (flags, plain) in expected.items():
        assert study.LENGTH_ARMS[(stage, arm)] == (flags, "full-plain")
        # lambda does not change the step time: each meets its twin's plain at equal compute (543 and 641 steps)
        assert study.ALSO_PAIRED[(stage, arm)] == plain and (stage, arm) in study.EVAL_NOISE_ARMS
    assert study.LENGTH_ARMS[(stage, "full-plain-equal-compute")][0][-1] == "543"
    assert study.LENGTH_ARMS[(stage, "full-plain-equal-compute-1.28")][0][-1] == "641"


def test_the_head_all_band_arm_is_the_high_band_with_only_the_denoiser_s_push_confined():
    stage, arm = "transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5-high-t-head-all"
    high = study.LENGTH_ARMS[(stage, "full-sadm+sddit-0.5-high-t")][0]
    assert study.LENGTH_ARMS[(stage, arm)] == (high + ["--sddit_band_scope", "encoder"], "full-plain")
    assert study.ALSO_PAIRED[(stage, arm)] == "full-plain-equal-compute-1.28" and (stage, arm) in study.EVAL_NOISE_ARMS


def test_the_continued_training_dose_arms_raise_only_lambda_and_meet_the_plain_arm_at_their_twin_s_compute():
    # continue-6m: SADM alone and the combination at lambda 0.02 (the arms that were run)
    assert list(study.CONTINUE_DOSE_ARMS) == [("continue-6m", "sadm-lambda-0.02"),
                                              ("continue-6m", "sadm-lambda-0.02+sddit-0.5")]
    twin = study.SCALE_ARMS[("continue-6m", "sadm+sddit-0.5")][0]
    arm = ("continue-6m", "sadm-lambda-0.02+sddit-0.5")
    assert study.SCALE_ARMS[arm] == (["--structure_weight", "0.02", *twin], "plain")
    equal = ("continue-6m", study.ALSO_PAIRED[arm])
    assert study.SCALE_ARMS[equal][0][-1] == "641"  # plain at the combination's x1.281
    assert arm in study.EVAL_NOISE_ARMS and equal in study.EVAL_NOISE_ARMS
    alone = ("continue-6m", "sadm-lambda-0.02")
    assert study.SCALE_ARMS[alone] == (["--structure_weight", "0.02"], "plain")
    assert study.ALSO_PAIRED[alone] == "plain-equal-compute" and alone in study.EVAL_NOISE_ARMS
    assert study.SCALE_ARMS[("continue-6m", "plain-equal-compute")][0][-1] == "543"
