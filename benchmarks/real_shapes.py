#!/usr/bin/env python
"""Training steps at the real model shapes, on CPU: DiT-XL/2 (256 px) and Stable Diffusion 1.5 (512 px).

Random weights, with the exact published configs written below (facebook/DiT-XL-2-256 and
stable-diffusion-v1-5: transformer / UNet, AutoencoderKL, CLIP ViT-L/14 text encoder, schedulers); no
download. Each arm runs the project's own trainer (`sadm_finetune.cli.main`, SADM on with its defaults)
for 2 steps at batch 2, fp32, one torch thread, in its own subprocess:

  full      full fine-tuning
  full_gc   full fine-tuning with --gradient_checkpointing
  lora      --trainable lora (rank 8, the family's attention projections)

Per arm: wall time of each training step (one step of `loop.train_loop`: from the loop's start, or the
previous step's end, to the trainer's `on_update` callback, so it includes fetching the batch, the VAE
encoding and, for SD, the text encoder; the callback's own work, checkpoints and validation, is not counted),
peak RSS (`resource.getrusage`) after the second step, and the activation memory of each step: the bytes
autograd saves for backward (a saved-tensors hook around the loop; each storage once, parameters excluded).
The hooks are `training.train_loop` and `training._on_update`, wrapped in this process only; the end-of-run
export and sampling (`training.export_run`) are patched out: they are not training. (The numbers in
benchmarks/README.md and results/real_shapes.json were taken before the one-loop refactor, timing
`StepRunner.micro_step`, i.e. without the batch fetch.) A watchdog kills an arm whose RSS would exceed
the memory available at its start minus a margin, and the arm is reported as skipped, so the benchmark
never pushes a shared machine into swap or the OOM killer; an arm whose static need (16 bytes per
trainable parameter + 4 per frozen one) is already above that limit is skipped without running.

    python benchmarks/real_shapes.py                 # all arms, ~40 min on 1 thread (measured: 38 min)
    python benchmarks/real_shapes.py --arms dit_full dit_lora
writes benchmarks/results/real_shapes.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # harness.py, also when imported as benchmarks.real_shapes
from harness import ROOT, offline_env, write_json  # noqa: E402
ARMS = ("dit_full", "dit_full_gc", "dit_lora", "sd_full", "sd_full_gc", "sd_lora")
GB = 1024**3

# facebook/DiT-XL-2-256, transformer/config.json
DIT_XL_2_256 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    norm_eps=1e-5,
)
# The Stable Diffusion VAE (sd-vae-ft-ema in DiT-XL-2-256; the same architecture in SD 1.5), vae/config.json
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)
# stable-diffusion-v1-5, unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# stable-diffusion-v1-5, text_encoder/config.json (CLIP ViT-L/14 text tower)
CLIP_VIT_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# The Hub schedulers: DiT's DDIM (linear betas), SD 1.5's PNDM (scaled-linear betas)
DIT_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024 / GB


# -- building the pipelines (in a subprocess each, so the parent stays small) ------------------------------

def build(family: str, work: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    from diffusers import AutoencoderKL

    if family == "dit":
        from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

        id2label = {i: f"class_{i}" for i in range(1000)}
        pipe = DiTPipeline(transformer=DiTTransformer2DModel(**DIT_XL_2_256),
                           vae=AutoencoderKL(**SD_VAE, sample_size=256), scheduler=DDIMScheduler(**DIT_SCHEDULER),
                           id2label=id2label)
        pipe.register_to_config(id2label=id2label)
        data = work / "dit_data"
        for c in ("class_a", "class_b"):
            (data / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(data / c / f"{i}.png")
    else:
        from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        # CLIP's tokenizer files are data, not config: a byte-level vocabulary (514 ids, all < 49408) stands in.
        symbols = list(bytes_to_unicode().values())
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!": 1}
        for s in symbols + [s + "</w>" for s in symbols]:
            vocab.setdefault(s, len(vocab))
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE, sample_size=512), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L_TEXT)),
            tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        data = work / "sd_data"
        data.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(4):
            Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8)).save(data / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing number {i}"}))
        (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    pipe.save_pretrained(work / f"{family}_pipeline", safe_serialization=True)
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    (work / f"{family}_params.json").write_text(json.dumps(counts))


# -- one arm, in its own process -----------------------------------------------------------------------------

def run_arm(arm: str, work: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from sadm_finetune.train import entry as training
    from sadm_finetune.cli import main

    family, mode = arm.split("_", 1)
    record: dict = {"step_s": [], "rss_after_step_gb": []}
    loop, on_update = training.train_loop, training._on_update
    step: dict = {}  # the step being measured: its start and the storages autograd saved in it

    def timed_loop(run, dataloader, dataset, state, callback):
        record["rss_before_first_step_gb"] = _rss_gb()  # weights are mmapped: pages count once touched
        # Activation memory, exactly: the bytes autograd saves for backward in each step (denoiser and
        # term phases), each storage once, parameters excluded. With gradient checkpointing, the
        # checkpointed blocks keep their own saved tensors out of this hook, so it counts what checkpointing keeps.
        params = {p.untyped_storage().data_ptr() for m in run.models() for p in m.parameters()}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and t.device.type != "meta":
                step["saved"][storage.data_ptr()] = storage.nbytes()
            return t

        step.update(start=time.perf_counter(), saved={})
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return loop(run, dataloader, dataset, state, callback)

    def timed_update(run, state, *args, **kwargs):  # after each update: the step ends here
        record["step_s"].append(time.perf_counter() - step["start"])
        record.setdefault("saved_activation_gb", []).append(sum(step["saved"].values()) / GB)
        record["rss_after_step_gb"].append(_rss_gb())
        try:
            return on_update(run, state, *args, **kwargs)  # checkpoints, validation: not the step
        finally:
            step.update(start=time.perf_counter(), saved={})

    training.train_loop, training._on_update = timed_loop, timed_update
    training.export_run = lambda *a, **k: None  # export and final sampling are not training: skipped here
    args = ["--pretrained", str(work / f"{family}_pipeline"), "--train_data_dir", str(work / f"{family}_data"),
            "--output_dir", str(work / f"out_{arm}"), "--overwrite_output_dir", "--max_train_steps", "2",
            "--train_batch_size", "2", "--learning_rate", "1e-5", "--report_to", "none", "--seed", "0",
            "--mixed_precision", "no", "--center_crop", "--resolution", "256" if family == "dit" else "512"]
    if mode == "full_gc":
        args.append("--gradient_checkpointing")
    if mode == "lora":
        args += ["--trainable", "lora"]
    start = time.perf_counter()
    rc = main(args)
    record.update(rc=rc, total_s=time.perf_counter() - start, peak_rss_gb=_rss_gb())
    write_json(work / f"{arm}.json", record, indent=None)


def _static_need_gb(arm: str, params: dict) -> float:
    family, mode = arm.split("_", 1)
    denoiser = params["transformer" if family == "dit" else "unet"]
    frozen = sum(params.values()) - denoiser
    trainable = 0 if mode == "lora" else denoiser
    return (16 * trainable + 4 * (denoiser - trainable) + 4 * frozen) / GB


def _launch(cmd: list[str], limit_gb: float, log: Path) -> tuple[int | None, float]:
    """Run cmd; kill it if its RSS passes limit_gb. Returns (return code or None if killed, max RSS seen)."""
    import psutil

    env = offline_env(threads=1, PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        ps, seen = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) / GB
            except psutil.Error:
                rss = 0.0
            seen = max(seen, rss)
            if rss > limit_gb:
                proc.kill()
                proc.wait()
                return None, seen
            time.sleep(0.5)
    return proc.returncode, seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--margin_gb", type=float, default=2.0, help="memory left free for the machine's other users")
    parser.add_argument("--work_dir", default=None, help="where the pipelines are built (default: a temp dir)")
    parser.add_argument("--_build", help=argparse.SUPPRESS)
    parser.add_argument("--_arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        return build(args._build, Path(args.work_dir)) or 0
    if args._arm:
        return run_arm(args._arm, Path(args.work_dir)) or 0

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="real_shapes_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"note": "CPU, fp32 (--mixed_precision no), 1 torch thread, batch 2, 2 steps, SADM defaults; "
                             "random weights with the published configs; *_gb fields are GiB (2**30 bytes); "
                             "rss_before_first_step_gb is small because the weights are mmapped until touched",
               "arms": {}}
    out_path = HERE / "results" / "real_shapes.json"
    if out_path.exists():  # a run of some arms updates those arms and keeps the others
        results["arms"] = json.loads(out_path.read_text()).get("arms", {})
    for family in dict.fromkeys(a.split("_")[0] for a in args.arms):
        if not (work / f"{family}_params.json").exists():
            print(f"building the {family} pipeline (random weights) in {work} ...", flush=True)
            rc, _ = _launch([sys.executable, __file__, "--work_dir", str(work), "--_build", family],
                            max(4.0, _available_gb() - args.margin_gb), work / f"build_{family}.log")
            if rc != 0:
                print(f"  build failed; see {work / f'build_{family}.log'}")
                return 1
        results[f"{family}_params"] = json.loads((work / f"{family}_params.json").read_text())
    print(f"{'arm':<12} {'step 1 s':>9} {'step 2 s':>9} {'peak RSS GiB':>13} {'activations GiB':>16}  note")
    for arm in args.arms:
        params = results[f"{arm.split('_')[0]}_params"]
        limit = _available_gb() - args.margin_gb
        need = _static_need_gb(arm, params)
        if need > limit:
            row = {"skipped": f"needs at least {need:.1f} GB (weights, grads, AdamW, frozen parts) and "
                              f"{limit:.1f} GB is available beyond the {args.margin_gb} GB margin"}
        else:
            rc, seen = _launch([sys.executable, __file__, "--work_dir", str(work), "--_arm", arm], limit,
                               work / f"{arm}.log")
            if rc is None:
                row = {"skipped": f"would not fit: stopped at {seen:.1f} GB RSS, over the {limit:.1f} GB available "
                                  f"beyond the {args.margin_gb} GB margin"}
            elif rc != 0 or not (work / f"{arm}.json").exists():
                tail = (work / f"{arm}.log").read_text()[-600:]
                row = {"failed": f"exit {rc}", "log_tail": tail}
            else:
                row = json.loads((work / f"{arm}.json").read_text())
                row["static_need_gb"] = round(need, 2)
        results["arms"][arm] = row
        if "step_s" in row:
            s = row["step_s"]
            act = row.get("saved_activation_gb", [float("nan")])[-1]
            print(f"{arm:<12} {s[0]:>9.1f} {s[-1]:>9.1f} {row['peak_rss_gb']:>13.2f} {act:>16.3f}", flush=True)
        else:
            print(f"{arm:<12} {'-':>9} {'-':>9} {'-':>13} {'-':>16}  {row.get('skipped') or row.get('failed')}",
                  flush=True)
        write_json(out_path, results, indent=1)  # after every arm: a partial run still leaves numbers
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
