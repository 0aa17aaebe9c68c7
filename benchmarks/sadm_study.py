"""Does SADM help? The method study: three regimes, paired seeds, confidence intervals.

    python benchmarks/sadm_study.py                 # the reduced default: the first 3 priority blocks (7 arms x 5
                                                    # seeds = 35 runs): SADM in continue and transfer (full and
                                                    # DiffFit), plus the re-noise variant. Measured: 3-4 min per run
                                                    # on 2 free cores, 2 at a time, so about 1 hour, plus about
                                                    # 15 min to build the two bases; several times longer on a
                                                    # busy machine
    python benchmarks/sadm_study.py --full          # + block 4 (LoRA, low-t, no-SN, low-pass, pool, the converged
                                                    # control) and the extra leads: about 2.5 h more
    python benchmarks/sadm_study.py --full --report_only   # summarise every run that is done
    python scripts/make_digits_encoder.py --output_dir runs/digits-encoder --steps 400 --num_threads 1   # ~2 min
    python benchmarks/sadm_study.py --terms         # the related papers' terms in the continue regime: plain, SADM,
                                                    # REPA, SD-DiT, SADM + REPA, then REPA at lambda 0.1, SD-DiT at
                                                    # 0.5, 1.0 and 2.0, SADM + SD-DiT 0.5 (10 arms x 5 seeds = 50 runs,
                                                    # measured 2-3 min each, 2 at a time: about 1 h on 2 free
                                                    # cores); results in benchmarks/results/terms_study
    python benchmarks/sadm_study.py --mechanism --work_dir runs/study   # the mechanism controls (frozen D,
                                                    # per-sample GAN, plain at equal compute), min pair weights and
                                                    # the recipe arms (no EMA, constant LR): 8 arms x 5 seeds;
                                                    # results in benchmarks/results/mechanism_study
    python benchmarks/sadm_study.py --mechanism --eval_noise --work_dir runs/study   # plain, SADM and plain at
                                                    # equal compute evaluated again: 2 more sampling seeds and DDPM
                                                    # 50 steps (45 evaluations); the paired differences per draw
    python benchmarks/sadm_study.py --recommend --work_dir runs/study   # SADM + SD-DiT, SD-DiT, SADM vs plain in
                                                    # the transfer regime (4 arms x 5 seeds)
    python benchmarks/sadm_study.py --scale --work_dir runs/study   # plain vs SADM with a 6.4 M DiT (continue
                                                    # regime, 5 seeds); results in benchmarks/results/scale_study

Regimes (all offline, built by the project's own scripts; each base shares the bundled demo VAE):
- continue: an under-trained base (scripts/make_demo_base.py, 1,500 steps at a constant 1e-3, no EMA)
  continued the way a user would (EMA 0.999, warm-up then cosine, 1e-4). The paper's continued
  training of DiT-XL/2 on ImageNet, in miniature.
- transfer: a base pre-trained on digits 0-4 only (3,000 steps, EMA) fine-tuned on 30 images each of
  digits 5-9 under their own class ids, which the base never trained: the paper's cross-domain
  fine-tuning in miniature. Arms: full, LoRA and DiffFit, each with and without SADM.
- converged: the bundled demo base on all digits (the README's first benchmark), as the control.

Every arm runs with seeds 0..4. An arm and its plain baseline share the seed, so they share the data
order, the noise and the timesteps of every step (the step's generator is seeded by (seed, epoch,
batch)); the comparison is paired: mean paired difference with a 95% t interval. Every output is
evaluated the same way (sadm-eval: DDIM 25 steps, no guidance, fixed sampling seeds, the bundled
digits classifier's features). Runs already done are skipped; the summary is rewritten after each run.
Results: benchmarks/results/sadm_study.json and .png.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported as benchmarks.sadm_study
from harness import (DEMO_BASE, DEMO_RECIPE, ROOT, offline_env, run_checked, sadm_eval_once,  # noqa: E402
                     t_interval, train_once, write_json)

METRICS = ("fid", "kid_mean", "precision", "recall", "label_accuracy", "structure_gap")
LOWER_IS_BETTER = {"fid", "kid_mean", "structure_gap"}

BASES = {  # name -> make_demo_base.py flags
    "continue": ["--dit_steps", "1500", "--lr_schedule", "constant", "--ema_decay", "0"],
    "transfer": ["--dit_steps", "3000", "--classes", "0", "1", "2", "3", "4"],
    # the scale study: the continue base at 3.3x the parameters (8 heads: 6.4 M), trained the same way
    "continue-6m": ["--dit_steps", "1500", "--lr_schedule", "constant", "--ema_decay", "0", "--dit_heads", "8"],
    # the third size: 16 heads (width 512, same depth): 24 M parameters
    "continue-24m": ["--dit_steps", "1500", "--lr_schedule", "constant", "--ema_decay", "0", "--dit_heads", "16"],
    # the transfer base at 6.4 M (8 heads), trained as the transfer base
    "transfer-6m": ["--dit_steps", "3000", "--classes", "0", "1", "2", "3", "4", "--dit_heads", "8"],
    # the transfer base at 23.1 M (16 heads): 1,500 steps, half the smaller transfer bases' (a 3,000-step base at
    # this size takes about 75 min of one core); pre-training only has to teach digits 0-4
    "transfer-24m": ["--dit_steps", "1500", "--classes", "0", "1", "2", "3", "4", "--dit_heads", "16"],
    # transfer-24m's recipe (EMA 0.999, cosine decay) on all ten digits: continue-24m's data with transfer's recipe.
    # Every base SADM paid from so far is a raw iterate at a constant LR (continue*); every base it tied from is an
    # EMA of a trained or fine-tuned model (transfer*, the second stages): this base separates the two (it changes
    # the EMA and the LR decay together)
    "continue-24m-ema": ["--dit_steps", "1500", "--dit_heads", "16"],
    # the two halves of that recipe apart: continue-24m with the EMA (0.999) but its constant LR. SADM paid from the
    # raw constant-LR base and tied from the EMA'd cosine one: is it the averaging?
    "continue-24m-ema-constant": ["--dit_steps", "1500", "--lr_schedule", "constant", "--dit_heads", "16"],
    # transfer-24m pre-trained as continue-24m was (constant LR, no EMA: a raw iterate) on digits 0-4: if the
    # base's recipe decides, transfer from a raw base pays as continue does
    "transfer-24m-raw": ["--dit_steps", "1500", "--lr_schedule", "constant", "--ema_decay", "0",
                         "--classes", "0", "1", "2", "3", "4", "--dit_heads", "16"],
    # the last cell of the EMA x LR-decay split: continue-24m with make_demo_base's cosine decay and no EMA. Its
    # trajectory is continue-24m-ema's (the EMA does not touch the iterate), so this is that base's raw iterate
    "continue-24m-cosine": ["--dit_steps", "1500", "--ema_decay", "0", "--dit_heads", "16"],
}
TRANSFER_CLASSES = (5, 6, 7, 8, 9)
TRANSFER_PER_CLASS = 30
# bases derived from a built one: name -> (source base, the class ids whose label-embedding rows are re-drawn).
# continue-24m with rows 5-9 of every block's label table re-drawn from the tables' own init, N(0, 1), with a seed
# of their own: the trunk was pre-trained on digits 5-9, but the vectors that now ask for them are new to it, as
# in a transfer base (whose rows 5-9 are their never-trained init). Pre-training moves a row by only 2-5% of its
# norm (0.4-1.1 of about 22.6 at 23.1 M), so resetting the rows to their init would leave the trunk reading them
# as before; fresh draws do not.
DERIVED_BASES = {"continue-24m-5to9-redrawn": ("continue-24m", TRANSFER_CLASSES)}
REDRAW_SEED = 1
# bases on the line through two others: name -> (centre, point, scale); the base is centre + scale * (point - centre),
# tensor by tensor (scale -1: point reflected through centre).
# continue-24m is the raw iterate whose EMA is continue-24m-ema-constant (the two runs share one trajectory: the EMA
# does not touch the iterate), so point - centre is the iterate's offset from its own average (0.77% of the weights'
# norm: SGD's noise, and the drift of a constant-LR run, which its EMA lags). The mirror sits as far from the average
# in the same directions, on the other side. SADM paid from the raw iterate and tied from its average: if it pays
# on the offset, it pays from the mirror too; if on the iterate itself, it ties there (it paid: -7.6%).
# Half the offset on the iterate's side (0.38%): does the gain scale with the offset, or need all of it?
OFFSET_BASES = {"continue-24m-mirrored": ("continue-24m-ema-constant", "continue-24m", -1.0),
                "continue-24m-half-offset": ("continue-24m-ema-constant", "continue-24m", 0.5),
                # twice the offset on the iterate's side (1.54%): past the raw iterate, away from the average
                "continue-24m-double-offset": ("continue-24m-ema-constant", "continue-24m", 2.0)}
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
# --weight_gaps: how far apart the 23.1 M bases of the EMA x decay split lie, ||a - b|| / ||b|| (a, b)
WEIGHT_GAP_PAIRS = (("continue-24m", "continue-24m-ema-constant"),  # the raw iterate and its EMA (constant LR)
                    ("continue-24m-mirrored", "continue-24m-ema-constant"),  # its mirror: the same distance
                    ("continue-24m-half-offset", "continue-24m-ema-constant"),  # half the distance
                    ("continue-24m-double-offset", "continue-24m-ema-constant"),  # twice it
                    ("continue-24m-cosine", "continue-24m-ema"),  # the same under the cosine decay
                    ("continue-24m-cosine", "continue-24m"),  # the two raw iterates: what the decay changes
                    ("continue-24m-ema", "continue-24m-ema-constant"),  # the two averages
                    ("transfer-24m-raw", "transfer-24m"),  # transfer's raw and EMA'd bases (different runs' ends)
                    # the two first stages of transfer's second stage: one trajectory, its raw iterate and its EMA
                    ("transfer-24m-full-long-raw-full-plain-seed0", "transfer-24m-full-long-full-plain-seed0"),
                    # the first stage at 1e-3 against that EMA (another trajectory: a distance, not its own offset)
                    ("transfer-24m-full-long-raw-lr1e-3-full-plain-seed0", "transfer-24m-full-long-full-plain-seed0"),
                    # and against its own EMA (one trajectory): its offset
                    ("transfer-24m-full-long-raw-lr1e-3-full-plain-seed0",
                     "transfer-24m-full-long-lr1e-3-full-plain-seed0"))

EMA_COSINE = ["--use_ema", "--ema_decay", "0.999", "--lr_scheduler", "cosine", "--lr_warmup_steps", "50"]
EMA_CONSTANT = ["--use_ema", "--ema_decay", "0.999", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "50"]
# the same run without the EMA (on by default, so turned off): its output is the raw iterate of EMA_CONSTANT's run
RAW_CONSTANT = ["--no_use_ema", *EMA_CONSTANT[3:]]
# that raw run at the base builds' LR (1e-3): the first stage of transfer's two-stage pipeline where SADM paid
RAW_CONSTANT_LR1E3 = RAW_CONSTANT + ["--learning_rate", "1e-3"]
EMA_CONSTANT_LR1E3 = EMA_CONSTANT + ["--learning_rate", "1e-3"]  # and with its EMA: the same trajectory's average
PLAIN = ["--structure_weight", "0"]
DISC_AUGMENT = ["--disc_augment", "translation,cutout"]


def equal_compute_arms(regime: str, steps: int,
                       prefix: str = "full-") -> dict[tuple[str, str], tuple[list[str], str | None]]:
    """A regime's plain, SADM, and plain given SADM's compute (``steps`` instead of the regime's), each paired with
    plain (ALSO_PAIRED pairs the last with SADM too)."""
    plain, sadm, equal = equal_compute_trio(regime, prefix)
    return {plain: (PLAIN, None), sadm: ([], plain[1]), equal: (PLAIN + ["--max_train_steps", str(steps)], plain[1])}


def equal_compute_trio(regime: str, prefix: str = "full-") -> tuple[tuple[str, str], ...]:
    """A regime's plain, SADM and plain-at-SADM's-compute arms, as (regime, arm)."""
    return tuple((regime, f"{prefix}{arm}") for arm in ("plain", "sadm", "plain-equal-compute"))


def continue_on_5to9(base: str) -> dict:
    """A regime that continues ``base`` (pre-trained on all ten digits) on every image of digits 5-9 and is judged on
    them: continue-24m-5to9's data, recipe, length and evaluation."""
    return {"steps": 500, "samples_per_class": 200, "recipe": EMA_COSINE, "base": base,
            "classes": list(TRANSFER_CLASSES)}


def transfer_on_all_5to9(recipe: list[str], base: str = "transfer-24m") -> dict:
    """A first stage of transfer's second stages: a transfer base (transfer-24m unless named) trained 1,200 plain
    steps on every image of digits 5-9 under ``recipe`` (one run, seed 0, the base of the stage)."""
    return {"steps": 1200, "samples_per_class": 200, "recipe": recipe, "base": base, "train_per_class": None}


def second_stage_on(run_regime: str) -> dict:
    """A second stage: ``run_regime``'s plain run (seed 0) continued 500 steps on its images under continue's
    recipe."""
    return {"steps": 500, "samples_per_class": 200, "recipe": EMA_COSINE, "base_run": [run_regime, "full-plain", 0]}


# regime -> base, data, steps, samples per class, the recipe shared by every arm
REGIMES = {
    "continue": {"steps": 500, "samples_per_class": 100, "recipe": EMA_COSINE},
    "transfer": {"steps": 400, "samples_per_class": 200, "recipe": EMA_CONSTANT},
    "converged": {"steps": 400, "samples_per_class": 100, "recipe": []},
    "continue-6m": {"steps": 500, "samples_per_class": 100, "recipe": EMA_COSINE},
    "continue-24m": {"steps": 500, "samples_per_class": 100, "recipe": EMA_COSINE},
    "transfer-6m": {"steps": 400, "samples_per_class": 200, "recipe": EMA_CONSTANT},
    "transfer-24m": {"steps": 400, "samples_per_class": 200, "recipe": EMA_CONSTANT},
    # run length (--length): the transfer-6m regime (same base, data and recipe) at 3x the steps
    "transfer-6m-long": {"steps": 1200, "samples_per_class": 200, "recipe": EMA_CONSTANT, "base": "transfer-6m"},
    # and at 23.1 M, where continued training gains -11% at equal compute: does transfer pay once its run is long?
    "transfer-24m-long": {"steps": 1200, "samples_per_class": 200, "recipe": EMA_CONSTANT, "base": "transfer-24m"},
    # the same run under a decaying LR (EMA + warm-up + cosine to 0, as continue): once the schedule anneals, do
    # plain's extra steps stop paying in transfer as they do in continue?
    "transfer-24m-long-cosine": {"steps": 1200, "samples_per_class": 200, "recipe": EMA_COSINE, "base": "transfer-24m"},
    # continued training at 23.1 M (the continue-24m base and recipe) on 150 of the 1,797 digits (15 per class), judged
    # against all of them: transfer's data size with continue's classes and base. Does SADM's -10.9% at equal compute
    # need the data (a discriminator that sees 150 images), or is it the base and its ten classes?
    "continue-24m-few": {"steps": 500, "samples_per_class": 100, "recipe": EMA_COSINE, "base": "continue-24m",
                         "train_per_class": 15},
    # a second stage of transfer: the 1,200-step plain transfer fine-tune at 23.1 M (transfer-24m-long, seed 0, near
    # its plateau) continued on the same 150 images for 500 steps under the continue recipe. Continued training of a
    # base on its own data pays SADM -10.9% at equal compute, where plain's extra steps gain nothing: is that the
    # plateau (then SADM pays in transfer once plain has converged), or the base having been pre-trained on that data?
    "transfer-24m-stage2": second_stage_on("transfer-24m-long"),
    # transfer on all of digits 5-9 (about 180 per class, 6x transfer's 150 images) under the continue recipe: on
    # 150 images continue's win held on DDIM 25 but tied on DDPM 50, so does transfer pay once it has the data?
    "transfer-24m-full": {"steps": 500, "samples_per_class": 200, "recipe": EMA_COSINE, "base": "transfer-24m",
                          "train_per_class": None},
    # the continue-24m base (pre-trained on all ten digits) continued on digits 5-9 only, all of them, judged on 5-9:
    # transfer-24m-full's data, recipe and evaluation with continue's base. Against transfer-24m-full it separates
    # the base's history (it has seen these digits) from the data; against continue-24m, five classes from ten
    "continue-24m-5to9": continue_on_5to9("continue-24m"),
    # the two differ in the base: continue's has learned digits 5-9 and reaches its plateau in the run, transfer's
    # must learn them first. A transferred base that has learned them on all their images: 1,200 steps of plain
    # transfer at a constant LR on all of 5-9 (one run, seed 0, the base of the next regime) ...
    "transfer-24m-full-long": transfer_on_all_5to9(EMA_CONSTANT),
    # ... then continued 500 steps on the same images under the continue recipe, as transfer-24m-stage2 did on 150
    "transfer-24m-full-stage2": second_stage_on("transfer-24m-full-long"),
    # continue-24m-5to9 from the continue-24m base with the label rows of 5-9 re-drawn (DERIVED_BASES): its trunk
    # has learned digits 5-9 in pre-training, but the class vectors asking for them are new, as in transfer. SADM
    # pays there from the base as pre-trained (-8.7% at equal compute) and not from a transferred one: do the
    # class rows decide, or the trunk?
    "continue-24m-5to9-redrawn": {"steps": 500, "samples_per_class": 200, "recipe": EMA_COSINE,
                                  "classes": list(TRANSFER_CLASSES)},
    # continue-24m-5to9 from a base pre-trained on all ten digits with EMA and a decaying LR (continue-24m-ema):
    # does SADM pay from a base that knows the digits whatever its recipe, or from a raw constant-LR iterate only?
    "continue-24m-ema-5to9": continue_on_5to9("continue-24m-ema"),
    # the same from a base with continue-24m's constant LR and only the EMA added (continue-24m-ema-constant): does
    # the averaging alone take SADM's gain away, or the LR decay?
    "continue-24m-ema-constant-5to9": continue_on_5to9("continue-24m-ema-constant"),
    # the two cells left of the EMA x decay split, and a control on the averaging. A cosine-decayed base without EMA
    # (continue-24m-cosine, the raw iterate of continue-24m-ema's run): does the decay alone take the gain away too?
    "continue-24m-cosine-5to9": continue_on_5to9("continue-24m-cosine"),
    # the raw base's offset from its EMA turned around (OFFSET_BASES): does SADM pay on the offset, or the iterate?
    "continue-24m-mirrored-5to9": continue_on_5to9("continue-24m-mirrored"),
    # and half of it on the iterate's side: a dose-response
    "continue-24m-half-offset-5to9": continue_on_5to9("continue-24m-half-offset"),
    # and twice it: does the gain keep growing past the raw iterate?
    "continue-24m-double-offset-5to9": continue_on_5to9("continue-24m-double-offset"),
    # transfer's second stage from a base off its own average whose trunk has learned digits 5-9: the 1,200-step
    # plain transfer run on all of 5-9 without its EMA (RAW_CONSTANT: transfer-24m-full-long's trajectory, whose
    # output is that run's EMA) ...
    "transfer-24m-full-long-raw": transfer_on_all_5to9(RAW_CONSTANT),
    # ... continued 500 steps on the same images under the continue recipe, as transfer-24m-full-stage2 (which tied,
    # +2.8%, from the EMA of the same trajectory)
    "transfer-24m-full-raw-stage2": second_stage_on("transfer-24m-full-long-raw"),
    # at the fine-tune's LR (1e-4) that raw iterate lies only 0.15% from its EMA (base_weight_gaps.json), near the
    # cosine base's 0.13%, where SADM tied; continue-24m's 0.77% came from its base build's constant 1e-3. The same
    # raw first stage at 1e-3 (the base builds' LR) ...
    "transfer-24m-full-long-raw-lr1e-3": transfer_on_all_5to9(RAW_CONSTANT_LR1E3),
    # (its EMA'd twin, one trajectory, measures that raw iterate's offset from its own average: --weight_gaps) ...
    "transfer-24m-full-long-lr1e-3": transfer_on_all_5to9(EMA_CONSTANT_LR1E3),
    # ... and the same second stage on it: transfer's test of the offset reading with an offset of continue's size
    "transfer-24m-full-raw-lr1e-3-stage2": second_stage_on("transfer-24m-full-long-raw-lr1e-3"),
    # that two-stage pipeline (SADM -14.7% at equal compute at 23.1 M) at the two smaller sizes, from their own
    # transfer bases (1.9 M and 6.4 M, 3,000 steps on digits 0-4): does the win hold, and grow with size?
    # Each first stage's EMA'd twin measures its raw iterate's offset from its own average (--weight_gaps)
    "transfer-full-long-raw-lr1e-3": transfer_on_all_5to9(RAW_CONSTANT_LR1E3, base="transfer"),
    "transfer-full-long-lr1e-3": transfer_on_all_5to9(EMA_CONSTANT_LR1E3, base="transfer"),
    "transfer-full-raw-lr1e-3-stage2": second_stage_on("transfer-full-long-raw-lr1e-3"),
    "transfer-6m-full-long-raw-lr1e-3": transfer_on_all_5to9(RAW_CONSTANT_LR1E3, base="transfer-6m"),
    "transfer-6m-full-long-lr1e-3": transfer_on_all_5to9(EMA_CONSTANT_LR1E3, base="transfer-6m"),
    "transfer-6m-full-raw-lr1e-3-stage2": second_stage_on("transfer-6m-full-long-raw-lr1e-3"),
    # and the 23.1 M tie's pipeline at 6.4 M: the raw first stage at the fine-tune's 1e-4 (a small offset from its
    # average at 23.1 M), its EMA'd twin, and the second stage on it. Does the offset reading hold at another size?
    "transfer-6m-full-long-raw": transfer_on_all_5to9(RAW_CONSTANT, base="transfer-6m"),
    "transfer-6m-full-long": transfer_on_all_5to9(EMA_CONSTANT, base="transfer-6m"),
    "transfer-6m-full-raw-stage2": second_stage_on("transfer-6m-full-long-raw"),
    # transfer-24m-full (all of digits 5-9, continue's recipe) from a transfer base pre-trained raw on 0-4, as
    # continue-24m was (transfer-24m-raw): the direct test of whether transfer pays from a raw base
    "transfer-24m-raw-full": {"steps": 500, "samples_per_class": 200, "recipe": EMA_COSINE, "base": "transfer-24m-raw",
                              "train_per_class": None},
    # transfer under the toolkit's default recipe (EMA + warm-up + cosine decay to 0, as continue): the same bases
    # and data; equal compute then compares two schedules that both anneal
    "transfer-cosine": {"steps": 400, "samples_per_class": 200, "recipe": EMA_COSINE, "base": "transfer"},
    "transfer-6m-cosine": {"steps": 400, "samples_per_class": 200, "recipe": EMA_COSINE, "base": "transfer-6m"},
}
LORA = ["--trainable", "lora", "--lora_rank", "8", "--learning_rate", "1e-3"]
DIFFFIT = ["--trainable", "difffit", "--learning_rate", "1e-3"]  # DiffFit's 10x learning rate

# (regime, arm) -> (flags on top of configs/demo.yaml + the regime's recipe, the arm it is paired with),
# in priority blocks: a block's runs go seed by seed, so paired arms finish together and CIs appear early.
PRIORITY: list[dict[tuple[str, str], tuple[list[str], str | None]]] = [
    {
        ("continue", "plain"): (PLAIN, None),
        ("continue", "sadm"): ([], "plain"),
        ("continue", "sadm-renoise"): (["--disc_renoise", "1.0"], "plain"),
    },
    {
        ("transfer", "full-plain"): (PLAIN, None),
        ("transfer", "full-sadm"): ([], "full-plain"),
    },
    {
        ("transfer", "difffit-plain"): (DIFFFIT + PLAIN, None),
        ("transfer", "difffit-sadm"): (DIFFFIT, "difffit-plain"),
    },
    {
        ("continue", "sadm-low-t"): (["--timestep_weighting", "cutoff"], "plain"),
        ("continue", "sadm-no-sn"): (["--no_disc_spectral_norm"], "plain"),
        ("transfer", "lora-plain"): (LORA + PLAIN, None),
        ("transfer", "lora-sadm"): (LORA, "lora-plain"),
        ("continue", "sadm-lowpass"): (["--disc_real_lowpass"], "plain"),
        ("continue", "sadm-pool2"): (["--disc_pool", "2"], "plain"),
        ("converged", "plain"): (PLAIN, None),
        ("converged", "sadm"): ([], "plain"),
    },
]
# The related papers' terms (--terms; results in their own file): each paired with plain, in the continue regime.
# REPA at the paper's lambda 0.5 against the offline digits encoder (scripts/make_digits_encoder.py) after 2
# of the 4 blocks; SD-DiT's encoder = the first 2 blocks, lambda 0.1 (DINO's cross-entropy starts near
# log(256) = 5.5, some 20x the diffusion loss); heads sized for the 1.9 M-parameter DiT. One setting each.
DIGITS_ENCODER = ROOT / "runs" / "digits-encoder"
REPA = ["--repa_weight", "0.5", "--repa_encoder", str(DIGITS_ENCODER), "--repa_depth", "2",
        "--repa_projector_dim", "256", "--repa_encoder_resolution", "32"]
SDDIT = ["--sddit_weight", "0.1", "--sddit_encoder_depth", "2", "--sddit_head_dim", "256",
         "--sddit_head_hidden_dim", "256"]
TERMS_ARMS: dict[tuple[str, str], tuple[list[str], str | None]] = {
    ("continue", "plain"): (PLAIN, None),
    ("continue", "sadm"): ([], "plain"),
    ("continue", "repa"): (REPA + PLAIN, "plain"),
    ("continue", "sddit"): (SDDIT + PLAIN, "plain"),
    ("continue", "sadm+repa"): (REPA, "plain"),
    # One other weight each, after the first five arms: does the verdict hinge on lambda?
    ("continue", "repa-0.1"): (REPA[:1] + ["0.1"] + REPA[2:] + PLAIN, "plain"),
    ("continue", "sddit-0.5"): (SDDIT[:1] + ["0.5"] + SDDIT[2:] + PLAIN, "plain"),
    # SD-DiT at 0.5 beat 0.1 on the first seeds: one weight higher, and with SADM.
    ("continue", "sddit-1.0"): (SDDIT[:1] + ["1.0"] + SDDIT[2:] + PLAIN, "plain"),
    ("continue", "sadm+sddit-0.5"): (SDDIT[:1] + ["0.5"] + SDDIT[2:], "plain"),
    ("continue", "sddit-2.0"): (SDDIT[:1] + ["2.0"] + SDDIT[2:] + PLAIN, "plain"),  # 1.0 beat 0.5: where does it turn?
}
# The mechanism study (--mechanism; results in benchmarks/results/mechanism_study): what does SADM do, and at what
# cost? Each arm paired with plain in the continue regime (the regime where fine-tuning helps). Controls: D frozen
# at its random initialisation (no adversary); a per-sample non-saturating GAN loss on D's scores (no structure;
# lambda 0.01 as SADM's: at initialisation its gradient on the denoiser's output is 0.84x SADM's, measured on
# the continue base, 3 batches of 32); plain given SADM's measured step-time ratio in extra steps (x1.39 ->
# 695 steps; the cosine schedule stretches with it). Formulation: min pair weights. Recipe: SADM and plain
# without EMA and with a constant learning rate (the toolkit's old defaults).
SDDIT_05 = SDDIT[:1] + ["0.5"] + SDDIT[2:]
# step-time ratios over plain measured by benchmarks/step_time.py --terms (the toolkit's loop, batch 32, one thread,
# 3 rounds; benchmarks/results/step_time_terms_6m.json and step_time_terms_24m.json)
COMBINATION_RATIO = {"6m": 1.2813, "24m": 1.2078}  # SADM + SD-DiT 0.5
SDDIT_RATIO = {"6m": 1.1652, "24m": 1.1694}  # SD-DiT 0.5 alone
# SADM + the lazy SD-DiT 0.5 (--sddit_every 4), by its mean step time (a lazy term's steps differ by design):
# step_time.py --models tiny-6m --terms --modes plain,sadm,sddit,sadm+sddit,sadm+sddit-every4 --rounds 3
# --tiny_steps 32, measured beside a base build (benchmarks/results/step_time_terms_6m_lazy.json; that load puts
# SADM at x1.134 and the full combination at x1.316 against the idle x1.089 and x1.281 above)
SDDIT_05_EVERY4 = SDDIT_05 + ["--sddit_every", "4"]
LAZY_COMBINATION_RATIO = {"6m": 1.168}
# SADM + SD-DiT 0.5 with the SD-DiT term on one half of the noise levels only (--sddit_t_max 500: t < 500;
# --sddit_t_min 500: t >= 500; uniform t, so each half carries about half the full term's push, and the two add up to
# it): which half carries SD-DiT's DDIM gain and which its DDPM loss? The band masks the loss, not the compute, so
# both cost the full combination's x1.281 and pair with its plain at 641 steps
# and at lambda 1.0 on its half: the full term's per-sample weight doubled where it acts, so the band's push over the
# batch equals the full term's (a half at 0.5 carries half of it: location and dose apart). Arm -> flags, in report order
SDDIT_BANDS = {"low-t": ["--sddit_t_max", "500"], "high-t": ["--sddit_t_min", "500"]}
SDDIT_BAND_ARMS = {f"full-sadm+sddit-{weight}-{band}": SDDIT[:1] + [weight] + SDDIT[2:] + flags
                   for weight in ("0.5", "1.0") for band, flags in SDDIT_BANDS.items()}
# Why do the halves add up to less than the full term (at 0.5: -0.026 and -0.032 FID over SADM alone, the full term
# -0.122)? Under a loss band the head learns from the band's samples only; with --sddit_band_scope encoder it learns
# from every sample and only the denoiser's push stays at t >= 500: the full term's head with the high band's push
SDDIT_BAND_ARMS["full-sadm+sddit-0.5-high-t-head-all"] = [*SDDIT_05, *SDDIT_BANDS["high-t"],
                                                         "--sddit_band_scope", "encoder"]
def sadm_dose_arms(prefix: str, combination_plain: str, alone: tuple[str, ...] = ("0.02",),
                   combined: tuple[str, ...] = ("0.02",)) -> dict[str, tuple[list[str], str]]:
    """SADM at the weights ``alone`` and, under SD-DiT 0.5, ``combined``: arm -> (flags, the plain arm at its
    compute: SADM's ``plain-equal-compute``, or ``combination_plain`` for the combination's)."""
    return {**{f"{prefix}sadm-lambda-{weight}": (["--structure_weight", weight], f"{prefix}plain-equal-compute")
               for weight in alone},
            **{f"{prefix}sadm-lambda-{weight}+sddit-0.5": (["--structure_weight", weight, *SDDIT_05],
                                                           f"{prefix}{combination_plain}") for weight in combined}}


# SADM's dose in that pipeline: lambda 0.02 and 0.04 alone, 0.02 under SD-DiT 0.5. With DDPM 50 the combination
# ties SADM alone (SD-DiT's share is a DDIM gain only), so its DDPM side is SADM's -8.2% at SADM's compute, and
# plain's extra steps at the combination's x1.281 take most of it: does SADM's DDPM gain grow with its weight (default
# 0.01)? Lambda does not change the step time, so each arm meets the plain arm its lambda-0.01 twin meets:
# arm -> (flags, that plain arm)
SADM_DOSE_ARMS = sadm_dose_arms("full-", "plain-equal-compute-1.28", alone=("0.02", "0.04"))
# the same dose in continued training (--scale), where at lambda 0.01 the combination gains -6.5% at its compute at
# 6.4 M (never drawn with DDPM) and SADM alone -5.4%: (regime, arm) -> (flags, that plain arm). (23.1 M, where the
# combination ties with DDPM 50, was not run: its base does not rebuild bit for bit, so it needs its plain arms
# again, about 1 h a seed here.)
CONTINUE_DOSE_ARMS = {("continue-6m", arm): pairing
                      for arm, pairing in sadm_dose_arms("", "plain-equal-compute-1.28").items()}
# the 6.4 M second stage's follow-up arms: arm -> (flags, the plain arm at its compute), in report order
STAGE2_6M_ARMS = {**{arm: (flags, "full-plain-equal-compute-1.28") for arm, flags in SDDIT_BAND_ARMS.items()},
                  **SADM_DOSE_ARMS}
# (regime, plain at an arm's measured compute) -> that arm, filled by at_its_compute; ALSO_PAIRED pairs them
AT_ITS_COMPUTE: dict[tuple[str, str], str] = {}


def at_its_compute(regime: str, arm: str, flags: list[str], ratio: float,
                   prefix: str = "full-") -> dict[tuple[str, str], tuple[list[str], str | None]]:
    """``arm`` (``flags``) and plain given its measured step-time ``ratio`` in extra steps (the regime's steps x
    ratio; the arm is named by the ratio to two places), both paired with plain, and the second with ``arm``."""
    equal = f"{prefix}plain-equal-compute-{ratio:.2f}"
    AT_ITS_COMPUTE[(regime, equal)] = arm
    steps = round(REGIMES[regime]["steps"] * ratio)
    return {(regime, arm): (flags, f"{prefix}plain"),
            (regime, equal): (PLAIN + ["--max_train_steps", str(steps)], f"{prefix}plain")}


EQUAL_COMPUTE_STEPS = 695  # 500 x 1.39, SADM's step-time ratio on the demo DiT (benchmarks/results/step_time.json)
NO_RECIPE = ["--no_use_ema", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
MECHANISM_ARMS: dict[tuple[str, str], tuple[list[str], str | None]] = {
    ("continue", "plain"): (PLAIN, None),
    ("continue", "sadm"): ([], "plain"),
    ("continue", "sadm-frozen-d"): (["--disc_frozen"], "plain"),
    ("continue", "per-sample-gan"): (["--adversarial_loss", "per_sample_ns"], "plain"),
    # the control at 10x the weight: is the per-sample loss weak only because its lambda is?
    ("continue", "per-sample-gan-0.1"): (["--adversarial_loss", "per_sample_ns", "--structure_weight", "0.1"], "plain"),
    ("continue", "plain-equal-compute"): (PLAIN + ["--max_train_steps", str(EQUAL_COMPUTE_STEPS)], "plain"),
    ("continue", "sadm-min-pairs"): (["--pair_weighting", "min"], "plain"),
    # the recommended combination (terms study: the best arm) at equal compute: SADM + SD-DiT 0.5 costs x1.46 step
    # time (benchmarks/results/step_time_terms.json: x1.459, rounded to x1.46), so plain gets 730 steps against it
    **at_its_compute("continue", "sadm+sddit-0.5", SDDIT_05, 1.46, prefix=""),
    # VQGAN's adaptive weight: lambda * |dL_S/d out| = 0.05 |dL_diff/d out| (SADM's default push is 1-7% of the
    # denoising gradient per noise band, mechanism_grad_bands.json)
    ("continue", "sadm-adaptive-0.05"): (["--adaptive_weight", "--structure_weight", "0.05"], "plain"),
    ("continue", "plain-no-recipe"): (PLAIN + NO_RECIPE, None),
    ("continue", "sadm-no-recipe"): (NO_RECIPE, "plain-no-recipe"),
    # the lambda sweep around the default 0.01 (0.05 is in --full)
    ("continue", "sadm-lambda-0.03"): (["--structure_weight", "0.03"], "plain"),
    ("continue", "sadm-lambda-0.1"): (["--structure_weight", "0.1"], "plain"),
    # the controls in the transfer regime (full fine-tune, 400 steps; SADM's x1.39 buys plain 556 steps)
    ("transfer", "full-plain"): (PLAIN, None),
    ("transfer", "full-sadm"): ([], "full-plain"),
    ("transfer", "full-sadm-frozen-d"): (["--disc_frozen"], "full-plain"),
    ("transfer", "full-per-sample-gan"): (["--adversarial_loss", "per_sample_ns"], "full-plain"),
    ("transfer", "full-plain-equal-compute"): (PLAIN + ["--max_train_steps", "556"], "full-plain"),
    # relations in a semantic space: D reads the digits encoder's patch features of the decoded latents
    # (scripts/make_digits_encoder.py: a DINOv2-architecture ViT, a different network from the FID classifier)
    ("continue", "sadm-features"): (["--disc_space", "features", "--disc_encoder", str(DIGITS_ENCODER),
                                     "--disc_encoder_resolution", "32"], "plain"),
    # the recipe in the transfer regime: no EMA, constant LR (the regime's recipe is EMA + warm-up, constant after)
    ("transfer", "full-plain-no-recipe"): (PLAIN + NO_RECIPE, None),
    ("transfer", "full-sadm-no-recipe"): (NO_RECIPE, "full-plain-no-recipe"),
    # the toolkit's default recipe in transfer (EMA + warm-up + cosine decay): does the EMA's cost (1.1 FID with a
    # constant LR) remain when the LR decays? (full-plain and full-sadm there: --scale)
    ("transfer-cosine", "full-plain"): (PLAIN, None),
    ("transfer-cosine", "full-plain-no-ema"): (PLAIN + ["--no_use_ema"], "full-plain"),
}
# The recommendation (--recommend; results in benchmarks/results/recommend_study): SADM + SD-DiT (lambda 0.5), the
# best arm of the continue regime (confirmed on fresh seeds, terms_confirm.json), measured in the transfer regime
# (full fine-tune) beside SD-DiT alone and SADM alone, each paired with plain.
RECOMMEND_ARMS: dict[tuple[str, str], tuple[list[str], str | None]] = {
    ("transfer", "full-plain"): (PLAIN, None),
    ("transfer", "full-sadm"): ([], "full-plain"),
    ("transfer", "full-sddit-0.5"): (SDDIT_05 + PLAIN, "full-plain"),
    ("transfer", "full-sadm+sddit-0.5"): (SDDIT_05, "full-plain"),
}
# The scale study (--scale; results in benchmarks/results/scale_study): SADM vs plain on the continue regime with a
# 3.3x larger DiT (6.4 M parameters, same data, latents, base recipe and fine-tuning recipe); the 1.9 M point is
# the mechanism study's plain/sadm pair.
# Equal compute at each size: SADM's step-time ratio shrinks as the denoiser grows around a D of fixed size
# (benchmarks/results/step_time_scale.json, the toolkit's loop, batch 32, one thread: x1.21 at 1.9 M, x1.085 at
# 6.4 M, x1.016 at 24 M), so plain gets 500 x ratio steps (the 1.9 M arm keeps the mechanism study's x1.39, 695).
SCALE_ARMS: dict[tuple[str, str], tuple[list[str], str | None]] = {
    **equal_compute_arms("continue", EQUAL_COMPUTE_STEPS, prefix=""),
    **equal_compute_arms("continue-6m", 543, prefix=""),
    # the recommended SADM + SD-DiT 0.5 at 6.4 M, at equal compute: x1.281 step time there, so plain gets 641 steps
    **at_its_compute("continue-6m", "sadm+sddit-0.5", SDDIT_05, COMBINATION_RATIO["6m"], prefix=""),
    # at 23.1 M SADM costs x1.016 (step_time_scale.json, 2 rounds) to x1.029 (step_time_terms_24m.json, 3 rounds):
    # plain gets the larger, 515 steps of 500 (a few steps still paid in transfer at this size)
    **equal_compute_arms("continue-24m", 515, prefix=""),
    # the recommended SADM + SD-DiT 0.5 in continue at 23.1 M, where SADM alone gains -10.9% at equal compute:
    # x1.208 step time there, so plain gets 604 steps against it
    **at_its_compute("continue-24m", "sadm+sddit-0.5", SDDIT_05, COMBINATION_RATIO["24m"], prefix=""),
    # SD-DiT alone there: is SADM's share of the combination more than noise at this size?
    ("continue-24m", "sddit-0.5"): (SDDIT_05 + PLAIN, "plain"),
    **{key: (flags, "plain") for key, (flags, _) in CONTINUE_DOSE_ARMS.items()},
    **equal_compute_arms("transfer", 556),
    **equal_compute_arms("transfer-6m", 434),
    # transfer at 23.1 M: SADM's x1.016 buys plain 6 steps of 400, which this regime (far from converged) may still
    # turn into FID, so the equal-compute arm runs here too
    **equal_compute_arms("transfer-24m", 406),
    # the best lambda of the continue sweep (0.03: -4.9% at equal steps at 1.9 M) where SADM's cost is smallest:
    # lambda does not change the step time, so plain at 406 steps is its equal compute too
    ("transfer-24m", "full-sadm-lambda-0.03"): (["--structure_weight", "0.03"], "full-plain"),
    # the recommended SADM + SD-DiT 0.5 in transfer at 23.1 M, where SADM alone came within -1.5% of plain at equal
    # compute: x1.208 step time there, so plain gets 483 steps of 400 against it
    **at_its_compute("transfer-24m", "full-sadm+sddit-0.5", SDDIT_05, COMBINATION_RATIO["24m"]),
    # transfer under the default recipe (cosine decay; the runs above keep a constant LR after warm-up)
    **equal_compute_arms("transfer-cosine", 556),
    **equal_compute_arms("transfer-6m-cosine", 434),
}
# Run length (--length; results in benchmarks/results/length_study): is transfer's equal-compute loss a property of
# 400 steps, far from converged (plain's 34 extra steps gain 0.9 FID at 6.4 M)? The transfer-6m regime at 3x the
# steps, SADM's x1.085 at 6.4 M buying plain 1302.
LENGTH_ARMS: dict[tuple[str, str], tuple[list[str], str | None]] = {
    **equal_compute_arms("transfer-6m-long", 1302),
    # the same at 23.1 M, where SADM costs x1.016-1.029 (as continue-24m, plain gets the larger: 1235 steps). At 400
    # steps SADM gains -4.5% there at equal steps and plain's 6 extra steps take two thirds of it (-1.5%): is that a
    # property of a short run, where every step still moves the EMA?
    **equal_compute_arms("transfer-24m-long", 1235),
    # and under a cosine decay: plain's 35 extra steps stretch its schedule (it still ends at LR 0), as in continue
    **equal_compute_arms("transfer-24m-long-cosine", 1235),
    # continue at 23.1 M on 150 images: plain gets 515 steps, as in continue-24m
    **equal_compute_arms("continue-24m-few", 515, prefix=""),
    # the second stage: SADM's x1.016-1.029 at 23.1 M buys plain 515 steps of 500, as in continue-24m
    **equal_compute_arms("transfer-24m-stage2", 515),
    # on 150 images D sees the same images in every batch: paired DiffAugment (translation + cutout) for D, in both
    # few-image regimes (D's inputs only: the step time stays SADM's, so plain's 515 steps are its equal compute too)
    ("transfer-24m-stage2", "full-sadm-augment"): (DISC_AUGMENT, "full-plain"),
    ("continue-24m-few", "sadm-augment"): (DISC_AUGMENT, "plain"),
    # transfer on all of digits 5-9, and continue on them: plain gets 515 steps, as in continue-24m
    **equal_compute_arms("transfer-24m-full", 515),
    **equal_compute_arms("continue-24m-5to9", 515, prefix=""),
    # the base of the second stage on all of 5-9 (trained by the stage when missing), and the stage
    ("transfer-24m-full-long", "full-plain"): (PLAIN, None),
    **equal_compute_arms("transfer-24m-full-stage2", 515),
    # continue's base with new class rows for 5-9, on all of them: plain gets 515 steps, as in continue-24m-5to9
    **equal_compute_arms("continue-24m-5to9-redrawn", 515, prefix=""),
    **equal_compute_arms("continue-24m-ema-5to9", 515, prefix=""),
    **equal_compute_arms("continue-24m-ema-constant-5to9", 515, prefix=""),
    **equal_compute_arms("continue-24m-cosine-5to9", 515, prefix=""),
    **equal_compute_arms("continue-24m-mirrored-5to9", 515, prefix=""),
    **equal_compute_arms("continue-24m-half-offset-5to9", 515, prefix=""),
    **equal_compute_arms("continue-24m-double-offset-5to9", 515, prefix=""),
    ("transfer-24m-full-long-raw", "full-plain"): (PLAIN, None),
    **equal_compute_arms("transfer-24m-full-raw-stage2", 515),
    ("transfer-24m-full-long-raw-lr1e-3", "full-plain"): (PLAIN, None),
    ("transfer-24m-full-long-lr1e-3", "full-plain"): (PLAIN, None),
    **equal_compute_arms("transfer-24m-full-raw-lr1e-3-stage2", 515),
    # the recommended SADM + SD-DiT 0.5 in that pipeline, where SADM alone wins -14.7% at equal compute: x1.208 step
    # time at 23.1 M, so plain gets 604 steps against it
    **at_its_compute("transfer-24m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5", SDDIT_05, COMBINATION_RATIO["24m"]),
    # SD-DiT alone there (SADM's share of the combination, where the combination ties SADM alone): x1.169 step time
    # at 23.1 M (step_time_terms_24m.json), so plain gets 585 steps against it
    **at_its_compute("transfer-24m-full-raw-lr1e-3-stage2", "full-sddit-0.5", SDDIT_05 + PLAIN, SDDIT_RATIO["24m"]),
    **equal_compute_arms("transfer-24m-raw-full", 515),
    # the two-stage pipeline at 1.9 M and 6.4 M: plain gets SADM's compute there as in the scale study (x1.39 at
    # 1.9 M: 695 steps of 500; x1.085 at 6.4 M: 543)
    ("transfer-full-long-raw-lr1e-3", "full-plain"): (PLAIN, None),
    ("transfer-full-long-lr1e-3", "full-plain"): (PLAIN, None),
    **equal_compute_arms("transfer-full-raw-lr1e-3-stage2", EQUAL_COMPUTE_STEPS),
    # and at the toolkit loop's own ratio at 1.9 M (x1.21, step_time_scale.json): 605 steps
    **at_its_compute("transfer-full-raw-lr1e-3-stage2", "full-sadm", [], 1.21),
    ("transfer-6m-full-long-raw-lr1e-3", "full-plain"): (PLAIN, None),
    ("transfer-6m-full-long-lr1e-3", "full-plain"): (PLAIN, None),
    **equal_compute_arms("transfer-6m-full-raw-lr1e-3-stage2", 543),
    # the recommended SADM + SD-DiT 0.5 in that pipeline, where SADM alone wins -11.2% at equal compute: x1.281 step
    # time at 6.4 M, so plain gets 641 steps against it; SD-DiT alone (for SADM's share of the combination) at its
    # own x1.165: 583 steps
    **at_its_compute("transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5", SDDIT_05, COMBINATION_RATIO["6m"]),
    **at_its_compute("transfer-6m-full-raw-lr1e-3-stage2", "full-sddit-0.5", SDDIT_05 + PLAIN, SDDIT_RATIO["6m"]),
    # the combination with the lazy SD-DiT (--sddit_every 4: lambda x 4 on one update in four). At 0.5 the combination
    # gains -15.8% with DDIM 25 and ties with DDPM 50, level with SADM alone at equal steps: is its DDPM loss against
    # plain the x1.281 compute that plain turns into steps? The lazy combination costs x1.168
    # (LAZY_COMBINATION_RATIO), within a step of SD-DiT alone's x1.165, so its equal compute is the same plain arm
    # (583 steps of 500; 500 x 1.168 = 584), paired with it in _OTHER_PAIRINGS
    ("transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5-every4"): (SDDIT_05_EVERY4, "full-plain"),
    **{("transfer-6m-full-raw-lr1e-3-stage2", arm): (flags, "full-plain")
       for arm, (flags, _) in STAGE2_6M_ARMS.items()},
    ("transfer-6m-full-long-raw", "full-plain"): (PLAIN, None),
    ("transfer-6m-full-long", "full-plain"): (PLAIN, None),
    **equal_compute_arms("transfer-6m-full-raw-stage2", 543),
}
# the same bench at 1.9 M, 6.4 M and 24 M parameters, per regime: (regimes by size, the arms' prefix)
SCALE_SERIES = {"continue": (("continue", "continue-6m", "continue-24m"), ""),
                "transfer": (("transfer", "transfer-6m", "transfer-24m"), "full-"),
                "transfer-cosine": (("transfer-cosine", "transfer-6m-cosine"), "full-"),
                # transfer's two-stage pipeline (a raw 1e-3 first stage, then the second stage): --scale_from
                "transfer-stage2": (("transfer-full-raw-lr1e-3-stage2", "transfer-6m-full-raw-lr1e-3-stage2",
                                     "transfer-24m-full-raw-lr1e-3-stage2"), "full-")}
# Second pairings reported beside the first (FID etc. vs another arm of the same seeds): every plain arm at an
# SADM arm's compute ("<prefix>plain-equal-compute", equal_compute_arms) is paired with that SADM arm (ALSO_PAIRED,
# below the arm tables), plain at another arm's measured compute with that arm (at_its_compute), and these with the
# arm named
_OTHER_PAIRINGS = {("continue", "sadm+repa"): "sadm",
                   ("continue", "sadm-frozen-d"): "sadm", ("continue", "per-sample-gan"): "sadm",
                   ("continue", "sadm-min-pairs"): "sadm", ("continue", "per-sample-gan-0.1"): "sadm",
                   ("continue", "sadm-adaptive-0.05"): "sadm", ("continue", "sadm-lambda-0.03"): "sadm",
                   ("continue", "sadm-lambda-0.1"): "sadm", ("transfer", "full-sadm-frozen-d"): "full-sadm",
                   ("transfer", "full-per-sample-gan"): "full-sadm", ("continue", "sadm-features"): "sadm",
                   ("transfer-24m", "full-sadm-lambda-0.03"): "full-plain-equal-compute",
                   ("transfer-24m-stage2", "full-sadm-augment"): "full-plain-equal-compute",
                   ("continue-24m-few", "sadm-augment"): "plain-equal-compute",
                   ("transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5-every4"): "full-plain-equal-compute-1.17",
                   **{("transfer-6m-full-raw-lr1e-3-stage2", arm): plain
                      for arm, (_, plain) in STAGE2_6M_ARMS.items()},
                   **{key: plain for key, (_, plain) in CONTINUE_DOSE_ARMS.items()}}
REDUCED_BLOCKS = 3  # the default study: the question itself in both regimes (continue; transfer, full and DiffFit)
ARMS = {k: v for block in PRIORITY for k, v in block.items()}
REDUCED_ARMS = {k: v for block in PRIORITY[:REDUCED_BLOCKS] for k, v in block.items()}
FULL_ARMS: dict[tuple[str, str], tuple[list[str], str | None]] = {
    ("continue", "sadm-lambda-0.05"): (["--structure_weight", "0.05"], "plain"),
    ("continue", "sadm-disc-lr-2e-5"): (["--disc_learning_rate", "2e-5"], "plain"),
    ("continue", "sadm-disc-warmup-200"): (["--disc_warmup_steps", "200"], "plain"),
    ("continue", "sadm-renoise-0.5-lowpass"): (["--disc_renoise", "0.5", "--disc_real_lowpass"], "plain"),
    ("transfer", "full-sadm-renoise"): (["--disc_renoise", "1.0"], "full-plain"),
    ("transfer", "full-sadm-lowpass"): (["--disc_real_lowpass"], "full-plain"),
}


def _env() -> dict[str, str]:
    return offline_env(threads=1)  # one torch thread per run: --jobs runs share the cores


def _run(cmd: list[str], what: str) -> None:
    run_checked(cmd, what, _env())


# ---------------------------------------------------------------------------------------------
# Bases and data


def build_base(name: str, work: Path) -> Path:
    out = work / "bases" / name
    if (out / "model_index.json").is_file():
        return out
    if name in DERIVED_BASES:
        source, classes = DERIVED_BASES[name]
        print(f"deriving the {name} base from {source}: label rows {list(classes)} re-drawn", flush=True)
        redraw_class_rows(build_base(source, work), out, classes, REDRAW_SEED)
    elif name in OFFSET_BASES:
        centre, point, scale = OFFSET_BASES[name]
        print(f"deriving the {name} base: {centre} + {scale} x ({point} - {centre})", flush=True)
        offset_base(build_base(centre, work), build_base(point, work), scale, out)
    else:
        print(f"building the {name} base (make_demo_base.py {' '.join(BASES[name])})", flush=True)
        _run([sys.executable, str(ROOT / "scripts" / "make_demo_base.py"), "--output_dir", str(out), "--vae_from",
              str(DEMO_BASE), "--num_threads", "1", "--no_samples", *BASES[name]], f"base {name}")
    return out


def redraw_class_rows(source: Path, out: Path, classes: tuple[int, ...], seed: int) -> Path:
    """A copy of the pipeline folder ``source`` whose transformer has the rows ``classes`` of every label-embedding
    table (``...class_embedder.embedding_table.weight``) re-drawn from N(0, 1), nn.Embedding's init; every other
    tensor and file is copied unchanged. Written next to ``out`` and moved into place when complete."""
    import torch

    def redraw(state: dict) -> None:
        tables = sorted(k for k in state if k.endswith("class_embedder.embedding_table.weight"))
        if not tables:
            raise ValueError(f"{source}: the transformer has no class-label embedding table to re-draw rows of")
        gen = torch.Generator().manual_seed(seed)
        rows = list(classes)
        for k in tables:
            fresh = torch.randn((len(rows), state[k].shape[1]), generator=gen, dtype=torch.float32)
            state[k][rows] = fresh.to(state[k].dtype)

    return _derive_transformer(source, out, redraw)


def offset_base(centre: Path, point: Path, scale: float, out: Path) -> Path:
    """A copy of the pipeline folder ``centre`` whose transformer lies ``scale`` times ``point``'s offset from
    ``centre``'s: every floating-point tensor becomes centre + scale * (point - centre) (computed in float32, stored
    in centre's dtype; scale -1 reflects point through centre); other tensors and every other file are centre's.
    Both transformers must hold the same tensors."""
    from safetensors.torch import load_file

    other = load_file(point / TRANSFORMER_WEIGHTS)

    def move(state: dict) -> None:
        if state.keys() != other.keys() or any(state[k].shape != other[k].shape for k in state):
            raise ValueError(f"{point} and {centre}: the transformers differ in their tensors; only the weights of one "
                             "architecture can be combined")
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = (v.float() + scale * (other[k].float() - v.float())).to(v.dtype)

    return _derive_transformer(centre, out, move)


def _derive_transformer(source: Path, out: Path, edit) -> Path:
    """Copy the pipeline folder ``source`` next to ``out``, let ``edit`` change its transformer's state dict in
    place, save it, and move the copy into place when complete."""
    import shutil

    from safetensors.torch import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    weights = tmp / TRANSFORMER_WEIGHTS
    state = load_file(weights)
    edit(state)
    save_file(state, str(weights), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


def weight_gap(a: Path, b: Path) -> float:
    """||a - b|| / ||b|| over the floating-point tensors of two pipelines' transformers (one architecture)."""
    from safetensors.torch import load_file

    x, y = load_file(a / TRANSFORMER_WEIGHTS), load_file(b / TRANSFORMER_WEIGHTS)
    keys = [k for k in y if y[k].is_floating_point()]
    diff = sum(float(((x[k].double() - y[k].double()) ** 2).sum()) for k in keys)
    return (diff / sum(float((y[k].double() ** 2).sum()) for k in keys)) ** 0.5


def base_folder(name: str, work: Path) -> Path:
    """Where the base ``name`` lies under ``work``: a study run named as a regime names the run it starts from
    (``<regime>-<arm>-seed<k>``, e.g. transfer-24m-full-long-full-plain-seed0) in runs/, any other in bases/."""
    for regime, arm in _STUDY_ARMS:
        prefix = f"{regime}-{arm}-seed"
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return work / "runs" / regime / f"{arm}-seed{name[len(prefix):]}"
    return work / "bases" / name


def weight_gaps(work: Path, pairs: tuple[tuple[str, str], ...]) -> list[dict]:
    """weight_gap for each (a, b) of ``pairs`` (WEIGHT_GAP_PAIRS unless --pairs), bases built (or runs trained)
    under ``work``; refuses before reading any if one is missing."""
    missing = sorted({n for pair in pairs for n in pair if not (base_folder(n, work) / TRANSFORMER_WEIGHTS).is_file()})
    if missing:
        raise SystemExit(f"--weight_gaps: bases {missing} are not built in {work}; run their regimes first "
                         "(or pass the --work_dir that holds them)")
    return [{"a": a, "b": b, "gap": weight_gap(base_folder(a, work), base_folder(b, work))} for a, b in pairs]


def write_digits_dataset(folder: Path, classes: tuple[int, ...], per_class: int | None, seed: int = 0) -> Path:
    """A local `datasets` parquet set of digits (label = the digit, names '0'..'9'): a subset per class."""
    if (folder / "train.parquet").is_file():
        return folder
    import datasets
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from sadm_finetune.data.digits import load_digits_images

    images, labels = load_digits_images(32)
    rng = np.random.default_rng(seed)
    keep = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        keep += sorted(rng.choice(idx, per_class, replace=False).tolist()) if per_class else idx.tolist()
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(images[i]) for i in keep],
                                     "label": [int(labels[i]) for i in keep]}, features=features)
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "train.parquet.tmp"))
    os.replace(folder / "train.parquet.tmp", folder / "train.parquet")
    return folder


def base_name(regime: str) -> str:
    """The base a regime fine-tunes (a regime may share another's base, e.g. a longer run of it, or start from
    another regime's fine-tuned run: "base_run")."""
    if "base_run" in REGIMES[regime]:
        run_regime, arm, seed = REGIMES[regime]["base_run"]
        return f"{run_regime}-{arm}-seed{seed}"
    return REGIMES[regime].get("base", regime)


def regime_setup(regime: str, work: Path) -> dict:
    if regime == "converged":
        return {"base": DEMO_BASE, "train": "builtin:digits", "reference": "builtin:digits"}
    if "base_run" in REGIMES[regime]:  # a fine-tune's output as the base (trained first if missing), on its data
        run_regime, arm, seed = REGIMES[regime]["base_run"]
        setup = regime_setup(run_regime, work)
        train_and_evaluate(run_regime, arm, _STUDY_ARMS[(run_regime, arm)][0], seed, setup, work)
        return {**setup, "base": work / "runs" / run_regime / f"{arm}-seed{seed}"}
    classes, per_class = regime_data(regime)
    return {"base": build_base(base_name(regime), work), "train": digits_set(work, classes, per_class),
            "reference": digits_set(work, classes, None)}


def regime_data(regime: str) -> tuple[tuple[int, ...], int | None]:
    """The digits a regime trains on and is judged against, and how many training images per digit (None: all).
    Continue regimes default to all ten digits, all images; transfer regimes to digits 5-9, 30 images each."""
    r = REGIMES[regime]
    if regime.startswith("continue"):
        return tuple(r.get("classes", range(10))), r.get("train_per_class")
    return tuple(r.get("classes", TRANSFER_CLASSES)), r.get("train_per_class", TRANSFER_PER_CLASS)


def digits_set(work: Path, classes: tuple[int, ...], per_class: int | None) -> str:
    """The built-in set for every image of all ten digits, else a parquet subset under work/data (named as the
    study always named them, so finished runs keep their data: digits-5-9-few, digits-5-9-all, digits-0-9-15)."""
    if classes == tuple(range(10)) and per_class is None:
        return "builtin:digits"
    size = ("all" if per_class is None else
            "few" if (classes, per_class) == (TRANSFER_CLASSES, TRANSFER_PER_CLASS) else str(per_class))
    return str(write_digits_dataset(work / "data" / f"digits-{classes[0]}-{classes[-1]}-{size}", classes, per_class))


# ---------------------------------------------------------------------------------------------
# One run: train, then evaluate


def evaluate(pipeline: Path, setup: dict, regime: str, work: Path, out_json: Path) -> dict:
    args = ["--pipeline", str(pipeline), "--reference_dataset", setup["reference"], "--features", "digits",
            "--classifier", "digits", "--samples_per_class", str(REGIMES[regime]["samples_per_class"]),
            "--num_inference_steps", "25", "--guidance_scale", "1.0", "--seed", "1234", "--batch_size", "250",
            "--reference_stats_cache", str(work / f"reference-{regime}.npz")]
    return sadm_eval_once(args, out_json, f"evaluating {pipeline}", _env())


def train_and_evaluate(regime: str, arm: str, flags: list[str], seed: int, setup: dict, work: Path) -> dict:
    out = work / "runs" / regime / f"{arm}-seed{seed}"
    result = out / "eval.json"
    if result.is_file():
        return json.loads(result.read_text())["metrics"]
    start = time.time()
    r = REGIMES[regime]
    train_once(["--config", str(DEMO_RECIPE), "--pretrained", str(setup["base"]), "--dataset_name", setup["train"],
                "--output_dir", str(out), "--overwrite_output_dir", "--seed", str(seed), "--max_train_steps",
                str(r["steps"]), "--report_to", "tensorboard", "--validation_inference_steps", "10",
                "--num_validation_images", "2", "--cache_latents", "--latent_cache_dir", str(work / "latent_cache"),
                *r["recipe"], *flags], out, f"training {regime}/{arm} seed {seed}", _env())
    trained = time.time() - start
    metrics = evaluate(out, setup, regime, work, result)
    print(f"  {regime}/{arm} seed {seed}: FID {metrics['fid']:.3f} (train {trained:.0f} s, total "
          f"{time.time() - start:.0f} s)", flush=True)
    return metrics


# Evaluation noise (--eval_noise): each checkpoint of these arms evaluated again with other sampling seeds and a
# second sampler, so the study can say whether a paired difference outlives the evaluation draw.
EVAL_DRAWS = {  # name -> (sampler, steps, seed, samples x the regime's); "ddim25-s1234" is every run's own eval.json
    "ddim25-s1235": ("pipeline", 25, 1235, 1),
    "ddim25-s1236": ("pipeline", 25, 1236, 1),
    # a second sampler: DDPM (ancestral) 50 steps. Euler is not usable here: DiTPipeline never scales its first
    # latents by init_noise_sigma (measured: FID 114 with Euler 50 where DDIM 25 gives 8)
    "ddpm50-s1234": ("ddpm", 50, 1234, 1),
    # DDIM with twice the steps: does a gain seen with DDIM 25 belong to few-step deterministic sampling?
    "ddim50-s1234": ("pipeline", 50, 1234, 1),
    # the study's draw with 5x the samples (5,000): is the paired difference a small-sample artefact?
    "ddim25-s1234-x5": ("pipeline", 25, 1234, 5),
}
STUDY_DRAW = ("ddim25-s1234", ("pipeline", 25, 1234, 1))  # every run's own eval.json
ALL_DRAWS = [STUDY_DRAW[0], *EVAL_DRAWS]
SMALL_DRAWS = ["ddim25-s1234", "ddim25-s1235", "ddim25-s1236", "ddpm50-s1234"]  # averaged: "mean_over_draws"
# the evaluation noise of one checkpoint: its FID's spread over sampling seeds of one sampler (DDPM 50 sits at another
# level, half DDIM 25's FID at 23.1 M, so a spread that mixed samplers would measure the sampler, not the noise)
SEED_DRAWS = ["ddim25-s1234", "ddim25-s1235", "ddim25-s1236"]
EVAL_NOISE_ARMS = (*equal_compute_trio("continue", ""), *equal_compute_trio("transfer"),
                   *equal_compute_trio("continue-6m", ""), *equal_compute_trio("transfer-6m"),
                   *equal_compute_trio("transfer-24m"), *equal_compute_trio("continue-24m", ""),
                   ("continue-24m", "sadm+sddit-0.5"), ("continue-24m", "plain-equal-compute-1.21"),
                   ("continue-6m", "sadm+sddit-0.5"), ("continue-6m", "plain-equal-compute-1.28"),
                   *CONTINUE_DOSE_ARMS,
                   ("transfer-24m", "full-sadm-lambda-0.03"),
                   *equal_compute_trio("transfer-24m-long"), *equal_compute_trio("transfer-24m-long-cosine"),
                   *equal_compute_trio("transfer-24m-stage2"), *equal_compute_trio("continue-24m-few", ""),
                   *equal_compute_trio("transfer-24m-full"), *equal_compute_trio("continue-24m-5to9", ""),
                   *equal_compute_trio("transfer-24m-full-stage2"),
                   *equal_compute_trio("continue-24m-5to9-redrawn", ""),
                   *equal_compute_trio("continue-24m-ema-5to9", ""),
                   *equal_compute_trio("continue-24m-ema-constant-5to9", ""),
                   *equal_compute_trio("continue-24m-cosine-5to9", ""),
                   *equal_compute_trio("continue-24m-mirrored-5to9", ""),
                   *equal_compute_trio("continue-24m-half-offset-5to9", ""),
                   *equal_compute_trio("continue-24m-double-offset-5to9", ""),
                   *equal_compute_trio("transfer-24m-full-raw-stage2"),
                   *equal_compute_trio("transfer-24m-full-raw-lr1e-3-stage2"),
                   *equal_compute_trio("transfer-24m-raw-full"),
                   *equal_compute_trio("transfer-full-raw-lr1e-3-stage2"),
                   *equal_compute_trio("transfer-6m-full-raw-lr1e-3-stage2"),
                   ("transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5"),
                   ("transfer-6m-full-raw-lr1e-3-stage2", "full-sddit-0.5"),
                   ("transfer-6m-full-raw-lr1e-3-stage2", "full-plain-equal-compute-1.28"),
                   ("transfer-6m-full-raw-lr1e-3-stage2", "full-plain-equal-compute-1.17"),
                   ("transfer-6m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5-every4"),
                   *(("transfer-6m-full-raw-lr1e-3-stage2", arm) for arm in STAGE2_6M_ARMS),
                   ("transfer-24m-full-raw-lr1e-3-stage2", "full-sadm+sddit-0.5"),
                   ("transfer-24m-full-raw-lr1e-3-stage2", "full-plain-equal-compute-1.21"),
                   ("transfer-24m-full-raw-lr1e-3-stage2", "full-sddit-0.5"),
                   ("transfer-24m-full-raw-lr1e-3-stage2", "full-plain-equal-compute-1.17"),
                   *equal_compute_trio("transfer-6m-full-raw-stage2"))
# each regime's baseline: the arm its table pairs with nothing (a KeyError here names an arm no study defines)
_STUDY_ARMS = {**ARMS, **FULL_ARMS, **TERMS_ARMS, **MECHANISM_ARMS, **RECOMMEND_ARMS, **SCALE_ARMS, **LENGTH_ARMS}
# a combination with SADM is paired with its other term alone wherever that arm runs too (SADM's share of it)
_WITHOUT_SADM = {(regime, arm): arm.replace("sadm+", "") for regime, arm in _STUDY_ARMS
                 if "sadm+sddit" in arm and (regime, arm.replace("sadm+", "")) in _STUDY_ARMS}
ALSO_PAIRED = {**_OTHER_PAIRINGS, **_WITHOUT_SADM, **AT_ITS_COMPUTE, **{(regime, arm): arm.removesuffix("plain-equal-compute") + "sadm"
                                  for regime, arm in _STUDY_ARMS if arm.endswith("plain-equal-compute")}}
EVAL_NOISE_PLAIN = {regime: arm for regime, arm in EVAL_NOISE_ARMS if _STUDY_ARMS[(regime, arm)][1] is None}


def evaluate_draw(regime: str, arm: str, seed: int, draw: str, work: Path) -> dict | None:
    out = work / "runs" / regime / f"{arm}-seed{seed}"
    result = out / f"eval-{draw}.json"
    if result.is_file():
        return json.loads(result.read_text())["metrics"]
    if not (out / "eval.json").is_file():
        return None  # not trained yet
    sampler, steps, sample_seed, times = EVAL_DRAWS[draw]
    reference = regime_setup(regime, work)["reference"]  # built already: the run was trained
    args = ["--pipeline", str(out), "--reference_dataset", reference, "--features", "digits", "--classifier",
            "digits", "--samples_per_class", str(times * REGIMES[regime]["samples_per_class"]), "--num_inference_steps",
            str(steps), "--sampler", sampler, "--guidance_scale", "1.0", "--seed", str(sample_seed), "--batch_size",
            "250", "--probe_images", "0", "--reference_stats_cache", str(work / f"reference-{regime}.npz")]
    return sadm_eval_once(args, result, f"evaluating {out} ({draw})", _env())


def equal_compute_key(regime: str, arm: str, plain: str) -> str:
    """The key of ``arm`` minus ``plain`` (plain at that arm's compute) in an _eval_noise report's "equal_compute"."""
    return f"{regime}/{arm} - {plain}"


def pair_on_draw(fid: dict[tuple, dict[str, float]], regime: str, arm: str, ref: str, draw: str,
                 seeds: list[int]) -> tuple[list[int], dict | None]:
    """arm minus ref on one draw, paired over the seeds where both were drawn (``fid``: (regime, arm, seed) -> {draw:
    FID}): those seeds, and the t_interval with ref's mean FID over them ("relative_to": the interval as a share of it
    is mean / relative_to), None where no seed has both."""
    both = [s for s in seeds if draw in fid.get((regime, arm, s), {}) and draw in fid.get((regime, ref, s), {})]
    if not both:
        return both, None
    ci = t_interval([fid[(regime, arm, s)][draw] - fid[(regime, ref, s)][draw] for s in both])
    ci["relative_to"] = statistics.fmean(fid[(regime, ref, s)][draw] for s in both)
    return both, ci


def eval_noise_result(work: Path, seeds: list[int]) -> dict:
    """Per draw: each arm's paired FID difference vs its regime's plain, and each SADM arm's vs plain given its
    compute ("equal_compute"); per checkpoint: the FID's spread over the DDIM sampling seeds (SEED_DRAWS), and the
    1,000-sample draws (SMALL_DRAWS) also
    averaged per checkpoint: "mean_over_draws")."""
    draws = ALL_DRAWS
    fid: dict[tuple, dict[str, float]] = {}
    for regime, arm in EVAL_NOISE_ARMS:
        for seed in seeds:
            out = work / "runs" / regime / f"{arm}-seed{seed}"
            for draw in draws:
                f = out / ("eval.json" if draw == STUDY_DRAW[0] else f"eval-{draw}.json")
                if f.is_file():
                    fid.setdefault((regime, arm, seed), {})[draw] = json.loads(f.read_text())["metrics"]["fid"]

    def small(key: tuple, names: list[str] = SMALL_DRAWS) -> list[float] | None:
        got = fid.get(key, {})
        return [got[d] for d in names] if all(d in got for d in names) else None

    def per_draw(regime: str, arm: str, ref: str) -> dict[str, dict | None]:
        """Per draw: arm minus ref (pair_on_draw; None where no seed has both)."""
        return {draw: pair_on_draw(fid, regime, arm, ref, draw, seeds)[1] for draw in draws}

    result: dict = {"draws": {k: list(v) for k, v in (STUDY_DRAW, *EVAL_DRAWS.items())},
                    "draw_fields": ["sampler", "steps", "sampling seed", "samples (x the regime's 1,000)"],
                    "paired_vs_plain": {}, "equal_compute": {}, "checkpoint_spread": {},
                    # every checkpoint's FID per draw: the report can be checked (or extended) without the work dir
                    "fid": {f"{r}/{a}/seed{s}": draws_of for (r, a, s), draws_of in sorted(fid.items())}}
    for regime, arm in EVAL_NOISE_ARMS:
        spreads = [statistics.stdev(v) for s in seeds if (v := small((regime, arm, s), SEED_DRAWS))]
        result["checkpoint_spread"][f"{regime}/{arm}"] = {
            "mean_sd_over_sampling_seeds": statistics.fmean(spreads) if spreads else math.nan,
            "checkpoints": len(spreads)}
        plain = EVAL_NOISE_PLAIN[regime]
        if arm == plain:
            continue
        vs_plain = per_draw(regime, arm, plain)
        # averaged over the 1,000-sample draws: each checkpoint's mean FID, then paired over seeds
        diffs = [statistics.fmean(a) - statistics.fmean(p) for s in seeds
                 if (a := small((regime, arm, s))) and (p := small((regime, plain, s)))]
        vs_plain["mean_over_draws"] = t_interval(diffs) if diffs else None
        result["paired_vs_plain"][f"{regime}/{arm}"] = vs_plain
    # the equal-compute question on every draw: the SADM arm minus plain given that arm's compute (ALSO_PAIRED),
    # in EVAL_NOISE_ARMS' order (plain's arm, then SADM's)
    pairs = []
    for (regime, arm), other in ALSO_PAIRED.items():
        if "equal-compute" in other:  # a SADM arm paired with plain at its compute, the other way round
            arm, other = other, arm
        if "equal-compute" in arm and (regime, arm) in EVAL_NOISE_ARMS and (regime, other) in EVAL_NOISE_ARMS:
            pairs.append((regime, arm, other))
    for regime, arm, other in sorted(pairs, key=lambda p: (EVAL_NOISE_ARMS.index(p[:2]),
                                                           EVAL_NOISE_ARMS.index((p[0], p[2])))):
        result["equal_compute"][equal_compute_key(regime, other, arm)] = per_draw(regime, other, arm)
    return result


def eval_noise_path(output: Path) -> Path:
    return output.with_name(output.name + "_eval_noise.json")


def eval_noise_report(work: Path, seeds: list[int], output: Path) -> dict:
    """eval_noise_result written to <output>_eval_noise.json (and its forest plot to .png), and printed."""
    result = eval_noise_result(work, seeds)
    refuse_to_shrink(eval_noise_path(output), result, work)
    path = write_json(eval_noise_path(output), result, indent=2, newline=True)
    try:
        plot_eval_noise(result["equal_compute"], path.with_suffix(".png"))
    except ImportError:  # matplotlib is not a dependency of the toolkit
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    for key, cis in (*result["paired_vs_plain"].items(), *result["equal_compute"].items()):
        print(key)
        for draw, ci in cis.items():
            if ci:
                rel = f" ({100 * ci['mean'] / ci['relative_to']:+.1f}%)" if "relative_to" in ci else ""
                print(f"  {draw:16s} n={ci['n']} dFID {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]{rel}")
    for key, spread in result["checkpoint_spread"].items():
        print(f"{key}: FID sd over the {len(SEED_DRAWS)} DDIM sampling seeds, mean over {spread['checkpoints']} "
              f"checkpoints: {spread['mean_sd_over_sampling_seeds']:.3f}")
    print(f"wrote {path}")
    return result


def plot_eval_noise(equal_compute: dict, path: Path) -> None:
    """A forest plot: per comparison (SADM arm minus plain at its compute), the paired ΔFID as a share of plain's FID
    on each evaluation draw, mean and 95% CI over the training seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(key, draws) for key, draws in equal_compute.items() if any(ci for ci in draws.values())]
    draw_names = [d for d in ALL_DRAWS if any(draws.get(d) for _, draws in rows)]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.3 * len(rows) * max(2, len(draw_names))))
    height = 0.8 / max(1, len(draw_names))
    for i, draw in enumerate(draw_names):
        ys, xs, lo, hi = [], [], [], []
        for row, (_, draws) in enumerate(rows):
            ci = draws.get(draw)
            if not ci or math.isnan(ci["low"]):
                continue
            f = 100 / ci["relative_to"]
            ys.append(row + (i - (len(draw_names) - 1) / 2) * height)
            xs.append(f * ci["mean"])
            lo.append(f * (ci["mean"] - ci["low"]))
            hi.append(f * (ci["high"] - ci["mean"]))
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=3, label=draw)
    ax.axvline(0, color="gray", linestyle="--")
    ax.set_yticks(range(len(rows)), [key for key, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired ΔFID / FID of plain at equal compute (%), mean and 95% CI over training seeds")
    ax.set_title("SADM arm − plain given its compute, on each evaluation draw (draws with < 2 seeds left out)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def base_metrics(regime: str, setup: dict, work: Path) -> dict:
    out = base_file(regime, work)
    if "base_run" in REGIMES[regime] and judged_as_at_home(regime) and not out.is_file():
        # a study run judged as its own regime judges it: its eval.json is this very draw (same reference, samples
        # and sampler seed), so it is not sampled again
        write_json(out, json.loads((Path(setup["base"]) / "eval.json").read_text()))
    return evaluate(Path(setup["base"]), setup, regime, work, out)


def judged_as_at_home(regime: str) -> bool:
    """Whether a regime judges its base on the digits and sample counts of the regime the base comes from (the
    pre-trained base's namesake, or the regime of a "base_run"); a base with no namesake regime is at home."""
    r = REGIMES[regime]
    home = r["base_run"][0] if "base_run" in r else r.get("base", regime)
    if home not in REGIMES:  # a base no regime is named after (continue-24m-ema): its first judge is its home
        return True
    judged = (regime_data(regime)[0], r["samples_per_class"])
    return judged == (regime_data(home)[0], REGIMES[home]["samples_per_class"])


def base_file(regime: str, work: Path) -> Path:
    """The base's metrics, shared by the regimes that judge it as its own regime does (base-<base>.json); a regime
    that judges it on other digits or sample counts (continue-24m-5to9) gets its own file."""
    return work / f"base-{base_name(regime)}{'' if judged_as_at_home(regime) else f'-on-{regime}'}.json"


# ---------------------------------------------------------------------------------------------
# Statistics


PROTOCOL_SEEDS = 5  # a verdict on fewer paired seeds is marked preliminary


def verdict(metric: str, ci: dict) -> str:
    if ci["n"] < 2 or math.isnan(ci["low"]):
        return "too few seeds"
    if ci["low"] <= 0 <= ci["high"]:
        word = "no measurable difference"
    else:
        better = (ci["high"] < 0) if metric in LOWER_IS_BETTER else (ci["low"] > 0)
        word = "better" if better else "worse"
    return word if ci["n"] >= PROTOCOL_SEEDS else f"{word} (preliminary: {ci['n']} seeds)"


def paired(seeds: dict, other: dict) -> dict | None:
    """Per metric: the mean paired difference (this arm minus `other`, over their common seeds), CI and verdict;
    None where the two arms share no finished seed (`--only` may run an arm without its plain)."""
    common = sorted(set(seeds) & set(other), key=int)
    if not common:
        return None
    out = {}
    for m in METRICS:
        ci = t_interval([seeds[s][m] - other[s][m] for s in common])
        ci["verdict"] = verdict(m, ci)
        out[m] = ci
    return out


def summarise(runs: dict, bases: dict, arms: dict) -> dict:
    summary: dict = {}
    for (regime, arm), (_, paired_with) in arms.items():
        seeds = runs.get(regime, {}).get(arm, {})
        if not seeds:
            continue
        entry = {"n": len(seeds), "per_seed": seeds, "paired_with": paired_with,
                 "mean": {m: statistics.fmean(s[m] for s in seeds.values()) for m in METRICS},
                 "std": {m: statistics.stdev([s[m] for s in seeds.values()]) if len(seeds) > 1 else 0.0
                         for m in METRICS}}
        if regime in bases:
            entry["minus_base"] = {m: entry["mean"][m] - bases[regime][m] for m in METRICS}
        if paired_with and (ci := paired(seeds, runs.get(regime, {}).get(paired_with, {}))):
            entry["paired"] = ci
        also = ALSO_PAIRED.get((regime, arm))
        if also and (ci := paired(seeds, runs.get(regime, {}).get(also, {}))):
            entry["also_paired"] = {also: ci}
        summary.setdefault(regime, {})[arm] = entry
    return summary


def plot(summary: dict, bases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if r in summary]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        names = [a for a, e in summary[regime].items() if "paired" in e]
        for i, name in enumerate(names):
            ci = summary[regime][name]["paired"]["fid"]
            ax.scatter([i] * len(ci["diffs"]), ci["diffs"], color="tab:blue", alpha=0.6, s=14)
            if not math.isnan(ci["low"]):
                ax.errorbar(i + 0.2, ci["mean"], yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]],
                            fmt="o", color="black", capsize=4)
        ax.axhline(0, color="gray", linestyle="--")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{regime}: FID(arm) - FID(paired plain)\nper seed (dots), mean and 95% CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def collect(work: Path, arms: dict, seeds: list[int]) -> tuple[dict, dict]:
    runs: dict = {}
    for (regime, arm) in arms:
        for seed in seeds:
            f = work / "runs" / regime / f"{arm}-seed{seed}" / "eval.json"
            if f.is_file():
                runs.setdefault(regime, {}).setdefault(arm, {})[str(seed)] = json.loads(f.read_text())["metrics"]
    bases = {r: json.loads(base_file(r, work).read_text())["metrics"] for r in REGIMES if base_file(r, work).is_file()}
    return runs, bases


def report_size(result: dict) -> int:
    """How much a report summarises: a study report's finished runs, an eval-noise report's paired seeds summed over
    its pairings and draws."""
    if "summary" in result:
        return sum(entry["n"] for arms in result["summary"].values() for entry in arms.values())
    return sum(ci["n"] for block in ("paired_vs_plain", "equal_compute") for cis in result.get(block, {}).values()
               for ci in cis.values() if ci)


def refuse_to_shrink(path: Path, result: dict, work: Path) -> None:
    """Stop before a report from a work dir with fewer finished runs replaces one written from more (a fresh clone's
    empty runs/study would otherwise overwrite the committed results in benchmarks/results)."""
    if path.is_file():
        old, new = report_size(json.loads(path.read_text())), report_size(result)
        if new < old:
            raise SystemExit(f"--output: {path} summarises {old} runs and draws, the work dir {work} only {new}; "
                             f"writing would lose results: pass --output <another path> (or --work_dir <the folder "
                             f"with the finished runs>)")


def build_report(work: Path, arms: dict, seeds: list[int]) -> dict:
    runs, bases = collect(work, arms, seeds)
    summary = summarise(runs, bases, arms)
    result = {"regimes": {r: {k: v for k, v in REGIMES[r].items()} for r in REGIMES}, "seeds": seeds,
              "arms": {f"{r}/{a}": {"flags": f, "paired_with": p} for (r, a), (f, p) in arms.items()},
              "base": bases, "summary": summary,
              "protocol": "DDIM 25 steps, guidance 1.0, sampling seed 1234, digits-classifier features; "
                          "paired by training seed; 95% Student-t interval of the mean paired difference"}
    if any(r.endswith(("-6m", "-24m")) for r, _ in arms):
        result["scale"] = scale_points(summary)
    return result


def write_report(work: Path, arms: dict, seeds: list[int], output: Path) -> dict:
    result = build_report(work, arms, seeds)
    refuse_to_shrink(output.with_suffix(".json"), result, work)
    if result.get("scale"):
        plot_scale(result["scale"], output.with_name(output.name.replace("_study", "") + "_dfid.png"))
    write_json(output.with_suffix(".json"), result, indent=1)
    if any("paired" in entry for arms in result["summary"].values() for entry in arms.values()):
        plot(result["summary"], result["base"], output.with_suffix(".png"))  # arms vs their plain: none, no plot
    return result


def root_base(regime: str) -> str:
    """The built base (a BASES entry) at the root of a regime's chain: a second stage's first stage's base, a
    derived or offset base's source. Its make_demo_base.py flags fix the architecture the regime trains."""
    while "base_run" in REGIMES[regime]:
        regime = REGIMES[regime]["base_run"][0]
    name = base_name(regime)
    name = DERIVED_BASES.get(name, (name,))[0]
    return OFFSET_BASES.get(name, (None, name))[1]


def denoiser_parameters(regime: str) -> int:
    """The parameter count of the DiT a regime trains: the bundled demo DiT's config at its root base's head and
    block counts (make_demo_base.py --dit_heads/--dit_layers), built on the meta device (no weights, no run)."""
    import torch
    from diffusers import DiTTransformer2DModel

    flags = BASES[root_base(regime)]
    config = json.loads((DEMO_BASE / "transformer" / "config.json").read_text())
    for flag, key in (("--dit_heads", "num_attention_heads"), ("--dit_layers", "num_layers")):
        if flag in flags:
            config[key] = int(flags[flags.index(flag) + 1])
    with torch.device("meta"):
        model = DiTTransformer2DModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def scale_points(summary: dict) -> list[dict]:
    """Per regime and model size: SADM's and plain-at-equal-compute's paired FID difference vs plain (absolute and
    relative to plain's mean FID), and SADM vs plain at equal compute."""
    points = []
    for series, (regimes, prefix) in SCALE_SERIES.items():
        plain_name, sadm_name, pec_name = f"{prefix}plain", f"{prefix}sadm", f"{prefix}plain-equal-compute"
        for regime in regimes:
            arms = summary.get(regime, {})
            if plain_name not in arms:
                continue
            params = denoiser_parameters(regime)
            plain = arms[plain_name]["mean"]["fid"]
            for arm, name in ((sadm_name, "sadm"), (pec_name, "plain-equal-compute")):
                if "paired" in arms.get(arm, {}):
                    ci = arms[arm]["paired"]["fid"]
                    points.append({"series": series, "regime": regime, "parameters": params, "arm": name,
                                   "n": ci["n"], "dfid": ci["mean"], "low": ci["low"], "high": ci["high"],
                                   "relative_to": plain, "relative": ci["mean"] / plain})
            also = arms.get(pec_name, {}).get("also_paired", {}).get(sadm_name)
            if also:  # SADM vs plain given SADM's compute: the equal-compute question itself
                ci, ref = also["fid"], arms[pec_name]["mean"]["fid"]
                points.append({"series": series, "regime": regime, "parameters": params,
                               "arm": "sadm vs plain-equal-compute", "n": ci["n"], "dfid": -ci["mean"],
                               "low": -ci["high"], "high": -ci["low"], "relative_to": ref, "relative": -ci["mean"] / ref})
    return points


def merged_summary(reports: list[Path]) -> dict:
    """The summaries of several reports as one; a regime in two of them must be the same in both."""
    summary: dict = {}
    for path in reports:
        for regime, arms in json.loads(path.read_text())["summary"].items():
            if summary.get(regime, arms) != arms:
                raise SystemExit(f"--scale_from: {regime} differs between the reports; name one report per regime")
            summary[regime] = arms
    return summary


def scale_from_reports(reports: list[Path], output: Path) -> dict:
    """SCALE_SERIES' points from finished reports (each size's runs may live in another work dir, or be gone):
    <output>.json (the points, their sources and the command) and <output>.png."""
    points = scale_points(merged_summary(reports))
    if not points:
        raise SystemExit(f"--scale_from: no regime of SCALE_SERIES with a plain arm in {[str(p) for p in reports]}")
    def shown(path: Path) -> str:  # inside the repository: relative to its root, as the command is run there
        full = path.resolve()
        return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(path)

    sources = [shown(p) for p in reports]
    result = {"command": f"python benchmarks/sadm_study.py --scale_from {' '.join(sources)} --output {shown(output)}",
              "sources": sources, "scale": points}
    write_json(output.with_suffix(".json"), result, indent=1)
    try:
        plot_scale(points, output.with_suffix(".png"))
    except ImportError:  # matplotlib is not a dependency of the toolkit
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return result


def plot_scale(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    series = [name for name in SCALE_SERIES if any(p["series"] == name for p in points)]
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 4.2 * len(series)), squeeze=False)
    colors = {"sadm": "tab:blue", "plain-equal-compute": "tab:gray", "sadm vs plain-equal-compute": "tab:red"}
    for row, name in zip(axes, series):
        for arm, color in colors.items():
            pts = sorted((p for p in points if p["series"] == name and p["arm"] == arm), key=lambda p: p["parameters"])
            if not pts:
                continue
            x = [p["parameters"] / 1e6 for p in pts]
            for ax, rel in zip(row, (False, True)):
                f = [100 / p["relative_to"] if rel else 1.0 for p in pts]
                y = [k * p["dfid"] for k, p in zip(f, pts)]
                err = [[k * (p["dfid"] - p["low"]) for k, p in zip(f, pts)],
                       [k * (p["high"] - p["dfid"]) for k, p in zip(f, pts)]]
                ax.errorbar(x, y, yerr=err, fmt="o-", color=color, capsize=4,
                            label=f"{arm} (n={min(p['n'] for p in pts)} seeds)")
        sizes = sorted({p["parameters"] / 1e6 for p in points if p["series"] == name})
        for ax, what in zip(row, ("paired ΔFID", "paired ΔFID / FID (%)")):
            ax.axhline(0, color="gray", linestyle="--")
            ax.set_xscale("log")
            ax.set_xticks(sizes, [f"{m:.1f}" for m in sizes])  # the measured sizes, not log-scale decades
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("DiT parameters (millions)")
            ax.set_ylabel(what)
            ax.set_title(f"{name} regime: {what}, mean and 95% CI", fontsize=9)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    for regime, arms in result["summary"].items():
        base = result["base"].get(regime)
        print(f"\n{regime}" + (f" (base FID {base['fid']:.3f})" if base else ""))
        for arm, e in arms.items():
            line = f"  {arm:<26} n={e['n']}  FID {e['mean']['fid']:.3f} ± {e['std']['fid']:.3f}"
            if "paired" in e:
                ci = e["paired"]["fid"]
                line += (f"  paired ΔFID {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] "
                         f"{ci['verdict']}")
            for other, p in e.get("also_paired", {}).items():
                ci = p["fid"]
                line += f"; vs {other} {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] {ci['verdict']}"
            print(line)


def markdown(result: dict) -> str:
    """README tables: per regime, each arm's mean ± std over seeds and its paired difference with the 95% CI."""
    lines = []
    for regime, arms in result["summary"].items():
        base = result["base"].get(regime)
        lines += [f"**{regime}**" + (f" (base before fine-tuning: FID {base['fid']:.2f}, label accuracy "
                                     f"{base['label_accuracy']:.3f})" if base else ""), "",
                  "| arm | seeds | FID | paired ΔFID [95% CI] | ΔKID | Δprecision | Δrecall | Δlabel acc. | "
                  "Δstructure gap | verdict (FID) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, e in arms.items():
            row = f"| {arm} | {e['n']} | {e['mean']['fid']:.2f} ± {e['std']['fid']:.2f} |"
            if "paired" in e:
                p = e["paired"]
                ci = p["fid"]
                row += f" {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] |"
                row += "".join(f" {p[m]['mean']:+.4f} |" for m in ("kid_mean", "precision", "recall", "label_accuracy",
                                                                  "structure_gap"))
                row += f" {ci['verdict']} |"
            else:
                row += " (baseline) | | | | | | |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every priority block plus the extra variants and leads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--terms", action="store_true",
                        help="the loss terms' arms (REPA, SD-DiT, SADM + REPA, each paired with plain) instead; "
                             "results in benchmarks/results/terms_study; needs scripts/make_digits_encoder.py first")
    parser.add_argument("--mechanism", action="store_true",
                        help="the mechanism study's controls (frozen D, per-sample GAN, equal compute), min pair "
                             "weights and the recipe arms; results in benchmarks/results/mechanism_study")
    parser.add_argument("--eval_noise", action="store_true",
                        help="with --mechanism: evaluate EVAL_NOISE_ARMS' checkpoints again with two more "
                             "sampling seeds, DDPM 50, DDIM 50 and 5x the samples; results in <output>_eval_noise.json "
                             "and .png")
    parser.add_argument("--recommend", action="store_true",
                        help="SADM + SD-DiT 0.5, SD-DiT 0.5 and SADM vs plain in the transfer regime (full fine-tune); "
                             "results in benchmarks/results/recommend_study")
    parser.add_argument("--scale", action="store_true",
                        help="SADM vs plain with a 3.3x larger DiT (continue regime); results in "
                             "benchmarks/results/scale_study")
    parser.add_argument("--length", action="store_true",
                        help="why transfer is not continue: the transfer regime at 6.4 M and 23.1 M with 3x the "
                             "steps (constant and cosine LR), a second stage on a converged transfer fine-tune, and "
                             "continue on 150 images; SADM vs plain at equal steps and equal compute; results in "
                             "benchmarks/results/length_study")
    parser.add_argument("--weight_gaps", action="store_true",
                        help="||a - b|| / ||b|| between the built bases of WEIGHT_GAP_PAIRS (raw iterates and their "
                             "EMAs); results in benchmarks/results/base_weight_gaps.json")
    parser.add_argument("--scale_from", nargs="+", type=Path, default=None, metavar="REPORT",
                        help="paired dFID against model size for SCALE_SERIES, from finished reports' JSON (e.g. one "
                             "--length report per size); results in <output>.json and .png; trains nothing")
    parser.add_argument("--pairs", nargs="+", default=None, metavar="A:B",
                        help="--weight_gaps: these pairs of bases or study runs (<regime>-<arm>-seed<k>) instead of "
                             "WEIGHT_GAP_PAIRS")
    parser.add_argument("--draws", nargs="+", default=None, choices=list(EVAL_DRAWS),
                        help="--eval_noise: the extra draws to evaluate (default: all)")
    parser.add_argument("--only", default=None, help="comma-separated regime/arm names to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--report_only", action="store_true", help="summarise finished runs, train nothing")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "study"))
    parser.add_argument("--output", default=None, help="results path without suffix (default: "
                        "benchmarks/results/sadm_study, or terms_study with --terms)")
    args = parser.parse_args()
    if args.output and "." in Path(args.output).name:  # .json and .png replace everything after a dot in the name
        raise SystemExit(f"--output: {args.output!r} has a dot in its name; give the results path without suffix "
                         f"and without dots, e.g. {Path(args.output).name.split('.')[0]}")
    if args.scale_from:
        missing = [str(p) for p in args.scale_from if not p.is_file()]
        if missing:
            raise SystemExit(f"--scale_from: no report at {missing}; name finished reports' .json files")
        if not args.output:
            raise SystemExit("--scale_from: pass --output <results path without suffix>")
        for p in scale_from_reports(args.scale_from, Path(args.output))["scale"]:
            print(f"{p['series']:>16} {p['parameters'] / 1e6:5.1f} M {p['arm']:<28} dFID {p['dfid']:+.3f} "
                  f"[{p['low']:+.3f}, {p['high']:+.3f}] ({100 * p['relative']:+.1f}%, n={p['n']})")
        return
    if args.pairs and not args.weight_gaps:
        raise SystemExit("--pairs: only with --weight_gaps")
    if args.weight_gaps:
        bad = [p for p in args.pairs or [] if p.count(":") != 1 or "" in p.split(":")]
        if bad:
            raise SystemExit(f"--pairs: {bad} are not A:B; name two bases or study runs per pair, e.g. "
                             "transfer-24m:transfer-24m-raw")
        pairs = tuple(tuple(p.split(":")) for p in args.pairs) if args.pairs else WEIGHT_GAP_PAIRS
        gaps = weight_gaps(Path(args.work_dir), pairs)
        for g in gaps:
            print(f"{g['a']:>28} vs {g['b']:<28} {100 * g['gap']:.2f}%")
        write_json(Path(args.output or ROOT / "benchmarks" / "results" / "base_weight_gaps").with_suffix(".json"), gaps)
        return
    arms = {**ARMS, **FULL_ARMS} if args.full else dict(REDUCED_ARMS)
    if args.terms:
        arms = dict(TERMS_ARMS)
        if not (DIGITS_ENCODER / "config.json").is_file():
            raise SystemExit(f"--terms: REPA's encoder {DIGITS_ENCODER} is missing; build it with "
                             f"python scripts/make_digits_encoder.py --output_dir {DIGITS_ENCODER}")
    if args.mechanism:
        arms = dict(MECHANISM_ARMS)
    if args.scale:
        arms = dict(SCALE_ARMS)
    if args.recommend:
        arms = dict(RECOMMEND_ARMS)
    if args.length:
        arms = dict(LENGTH_ARMS)
    name = ("terms_study" if args.terms else "mechanism_study" if args.mechanism else "scale_study" if args.scale
            else "recommend_study" if args.recommend else "length_study" if args.length else "sadm_study")
    args.output = args.output or str(ROOT / "benchmarks" / "results" / name)
    if args.only:
        wanted = set(args.only.split(","))
        known = EVAL_NOISE_ARMS if args.eval_noise else arms
        unknown = wanted - {f"{r}/{a}" for r, a in known}
        if unknown:
            raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {sorted(f'{r}/{a}' for r, a in known)}")
    work, output = Path(args.work_dir), Path(args.output)
    # before any run (the writers check again): a report from this work dir must not replace one written from more
    if args.eval_noise:
        if not args.report_only:
            refuse_to_shrink(eval_noise_path(output), eval_noise_result(work, args.seeds), work)
            jobs = [(r, a, s, d) for s in args.seeds for (r, a) in EVAL_NOISE_ARMS for d in (args.draws or EVAL_DRAWS)
                    if not args.only or f"{r}/{a}" in args.only.split(",")]
            jobs.sort(key=lambda j: (j[0] != "continue", j[2]))  # the continue checkpoints first, seed by seed
            with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(lambda j: evaluate_draw(*j, work), jobs))
        eval_noise_report(work, args.seeds, output)
        return
    if args.report_only:
        result = write_report(work, arms, args.seeds, output)
        print_table(result)
        print("\n" + markdown(result))
        return
    refuse_to_shrink(output.with_suffix(".json"), build_report(work, arms, args.seeds), work)

    # Seed-major within each priority block: paired arms finish together, so CIs appear early.
    jobs = [(r, a, f, s) for s in args.seeds for (r, a), (f, _) in arms.items()
            if not args.only or f"{r}/{a}" in wanted]
    setups = {r: regime_setup(r, work) for r in REGIMES if any(j[0] == r for j in jobs)}
    for regime, setup in setups.items():
        base_metrics(regime, setup, work)
    def block(arm: tuple[str, str]) -> int:
        if args.terms:  # the first five arms seed by seed, then the other weights, then SD-DiT's follow-ups
            first = ("plain", "sadm", "repa", "sddit", "sadm+repa")
            return 0 if arm[1] in first else 1 if arm[1] in ("repa-0.1", "sddit-0.5") else 2 if arm[1] != "sddit-2.0" else 3
        if args.mechanism:  # the controls first, then the formulation and the recipe arms
            return 0 if arm[1] in ("plain", "sadm", "sadm-frozen-d", "per-sample-gan", "plain-equal-compute") else 1
        return next((i for i, b in enumerate(PRIORITY) if arm in b), len(PRIORITY))

    jobs.sort(key=lambda j: (block(j[:2]), j[3], list(arms).index(j[:2])))
    lock = threading.Lock()
    failures = []

    def one(job):
        regime, arm, flags, seed = job
        try:
            train_and_evaluate(regime, arm, flags, seed, setups[regime], work)
        except RuntimeError as e:
            failures.append(f"{regime}/{arm} seed {seed}: {str(e)[:2000]}")
            print(failures[-1], flush=True)
        with lock:
            write_report(work, arms, args.seeds, output)

    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, jobs))
    result = write_report(work, arms, args.seeds, output)
    print_table(result)
    print(f"\nwrote {output.with_suffix('.json')} and {output.with_suffix('.png')}")
    if failures:
        raise SystemExit(f"{len(failures)} runs failed")


if __name__ == "__main__":
    main()
