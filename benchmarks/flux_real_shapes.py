#!/usr/bin/env python
"""One LoRA step at Flux.1-dev's shapes on this CPU: an int8 base (--quantize_base int8, torchao), cached text
embeddings, 256 px, batch 1. Reports peak memory and time; the goal is to fit in 20 GB of RAM.

What is real and what stands in (no download, random weights):
- the transformer: FluxTransformer2DModel with black-forest-labs/FLUX.1-dev's transformer/config.json (diffusers'
  defaults for the class are that config, plus guidance_embeds): 19 dual- and 38 single-stream blocks, width 3072,
  11.9 B parameters. `--depth D S` builds D dual and S single blocks instead (the per-block cost is extrapolated
  from two depths). Its weights are written in bf16 (as the Hub stores them) shard by shard, straight from the meta
  device: no full-precision copy of the model ever exists in memory;
- the VAE: FLUX.1-dev's vae/config.json (16 latent channels, shift 0.1159, scale 0.3611), random weights;
- the text encoders: CLIP ViT-L/14's text tower at its real shape; T5-XXL is one of its 24 layers (d_model 4096,
  64 heads, d_ff 10240) with a 100-symbol vocabulary: with --cache_text_embeddings both encode the prompts once and
  leave memory before the first step, so the step sees T5's real output (512 tokens of width 4096) and not its
  size. The 4.7 B-parameter T5-XXL's own caching pass is not measured here;
- the scheduler: FLUX.1-dev's (dynamic shift).

The step runs through the project's trainer (`sadm_finetune.cli.main`) in a subprocess: --trainable lora (the
family's default targets, rank 8), --quantize_base int8, --cache_text_embeddings, --resolution 256,
--train_batch_size 1, --structure_weight 0 (SADM needs pairs: batch 2), one step; the export is patched out.
A watchdog in the parent samples the child's RSS and anonymous memory (/proc/<pid>/status) every 0.2 s and kills it
when MemAvailable drops under 3 GiB (the machine is shared), reporting the arm as killed.

Per arm: time to load (trainer start to the loop), the step's wall time, peak RSS and peak anonymous memory (RSS
counts the mmapped safetensors pages the loader touched, which the kernel can drop; anonymous memory is what must
fit), and the quantized layer count.

The arm runs with MALLOC_MMAP_THRESHOLD_=65536 (--malloc_mmap_threshold 0: glibc's default). glibc raises its mmap
threshold to the size of each large block it frees (up to 32 MiB); from then on the step's activations (9-38 MiB at
768 tokens x 3072) come from its heap arenas, and what one checkpointed block frees stays there, fragmented, beside
the small tensors the next block keeps: anonymous memory grew with depth while the tensors alive did not. Measured
with checkpointing (glibc's mallinfo2 at each block boundary, 1+2 blocks): during the step live malloc bytes rose
0.16 GiB and the arenas' free bytes 0.69 GiB; with the fixed threshold the step added 0.55 GiB at 1+2 blocks and
0.56 GiB at 2+4 (1.25 and 1.57 GiB under glibc's default); step 44 and 79 s (41 and 69 s), within this shared
CPU's noise. That is the allocator, not the toolkit: a CPU run sets the variable in its own environment (README,
LoRA on a quantized base).

    python benchmarks/flux_real_shapes.py --depth 2 4            # reduced depth first
    python benchmarks/flux_real_shapes.py --depth 19 38 --gradient_checkpointing  # the full model
appends to benchmarks/results/flux_real_shapes.json. Measured: the full model's step with checkpointing peaks at
12.71 GiB anonymous memory (11.73 GiB loaded; load 259 s, step 712 s), so it fits in 20 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GB = 1024**3
MIN_AVAILABLE_GB = 3.0

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# black-forest-labs/FLUX.1-dev, vae/config.json
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                    mid_block_add_attention=True)
# black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                          use_dynamic_shifting=True, num_train_timesteps=1000)
# openai/clip-vit-large-patch14's text tower (FLUX.1-dev text_encoder/config.json)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
# google/t5-v1_1-xxl encoder (FLUX.1-dev text_encoder_2/config.json), one layer of its 24
T5_XXL_ONE_LAYER = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                        relative_attention_num_buckets=32, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return out


# -- the pipeline on disk, built from the meta device --------------------------------------------------------

def _init_like(name: str, shape: tuple[int, ...], generator) -> "torch.Tensor":
    """A random bf16 tensor of `shape`: weights ~ N(0, 1/fan_in) (activations keep their scale through depth),
    biases 0, norm scales 1."""
    import torch

    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).to(torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.ones(shape, dtype=torch.bfloat16)


def write_transformer(folder: Path, depth: tuple[int, int], shard_bytes: int = 2 * GB) -> int:
    """FluxTransformer2DModel at FLUX.1-dev's config (with `depth` blocks) as a sharded bf16 safetensors folder,
    each shard generated and written alone; returns the parameter count."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    config = {**FLUX_DEV_TRANSFORMER, "num_layers": depth[0], "num_single_layers": depth[1]}
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    del model
    generator = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: _init_like(name, shapes[name], generator) for name in names}, str(folder / file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    total = sum(math.prod(s) for s in shapes.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    return total


def build(work: Path, depth: tuple[int, int]) -> dict:
    """The pipeline folder (transformer written shard by shard; the small components saved whole) and one
    captioned 256 px image."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pipeline = work / f"flux_{depth[0]}_{depth[1]}"
    if not pipeline.exists():  # built under another name and renamed when complete
        import shutil

        partial = pipeline.with_name(pipeline.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        torch.manual_seed(0)
        symbols = list(bytes_to_unicode().values())  # CLIP's vocabulary files are data: a byte-level one stands in
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!": 1}
        for s in symbols + [s + "</w>" for s in symbols]:
            vocab.setdefault(s, len(vocab))
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
        t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[(chr(c), -1.0) for c in range(32, 127)],
                    ("\u2581", -1.0)]
        tokenizer_2 = T5TokenizerFast(vocab=t5_vocab, extra_ids=0, model_max_length=512)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=AutoencoderKL(**FLUX_DEV_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L_TEXT)), tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5_XXL_ONE_LAYER)),
            tokenizer_2=tokenizer_2, transformer=None)
        pipe.save_pretrained(partial, safe_serialization=True)
        del pipe
        index = json.loads((partial / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
        write_transformer(partial / "transformer", depth)
        (partial / "model_index.json").write_text(json.dumps(index, indent=2))
        partial.rename(pipeline)
    data = work / "data"
    if not data.exists():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(data / "0.png")
        (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a photo of a thing"}) + "\n")
    return {"pipeline": str(pipeline), "data": str(data)}


# -- one arm, in its own process -----------------------------------------------------------------------------

def run_arm(work: Path, pipeline: str, data: str, extra: list[str], out: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("FLUX_BENCH_THREADS", "2")))
    from sadm_finetune.cli import main
    from sadm_finetune.train import entry as training
    from sadm_finetune.tuners.quantization import quantized_weights

    record: dict = {}
    loop, on_update = training.train_loop, training._on_update
    start = time.perf_counter()
    step: dict = {}

    def timed_loop(run, dataloader, dataset, state, callback):
        record["load_s"] = time.perf_counter() - start  # trainer start to the loop: load, quantize, cache text
        record["rss_before_step_gb"] = _status(os.getpid()).get("VmRSS", 0) / GB
        record["anon_before_step_gb"] = _status(os.getpid()).get("RssAnon", 0) / GB
        model = run.unwrapped_denoiser
        record["quantized_linear_layers"] = quantized_weights(model)
        record["parameters"] = sum(p.numel() for p in model.parameters())
        record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out.write_text(json.dumps(record))  # what is known before the step, should the step be killed
        step["start"] = time.perf_counter()
        return loop(run, dataloader, dataset, state, callback)

    def timed_update(run, state, *args, **kwargs):
        record.setdefault("step_s", []).append(time.perf_counter() - step["start"])
        try:
            return on_update(run, state, *args, **kwargs)
        finally:
            step["start"] = time.perf_counter()

    training.train_loop, training._on_update = timed_loop, timed_update
    training.export_run = lambda *a, **k: None  # the export is not the step
    args = ["--pretrained", pipeline, "--train_data_dir", data, "--output_dir", str(work / "out"),
            "--overwrite_output_dir", "--resolution", "256", "--center_crop", "--train_batch_size", "1",
            "--max_train_steps", "1", "--trainable", "lora", "--quantize_base", "int8", "--quantize_backend", "torchao",
            "--cache_text_embeddings", "--text_cache_dir", str(work / "text"), "--structure_weight", "0",
            "--no_structure_diagnostics",  # the structure probe compares pairs: it needs batch 2
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "0", *extra]
    record["rc"] = main(args)
    record["total_s"] = time.perf_counter() - start
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    out.write_text(json.dumps(record))


def watch(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`, sampling its memory; kill it when MemAvailable drops under MIN_AVAILABLE_GB."""
    def die_with_parent() -> None:  # PR_SET_PDEATHSIG: the arm never outlives this watchdog
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)

    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)
    seen = {"peak_anon_gb": 0.0, "peak_rss_gb": 0.0, "min_available_gb": _meminfo()["MemAvailable"] / GB,
            "killed": False}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        status, available = _status(proc.pid), _meminfo()["MemAvailable"] / GB
        seen["peak_anon_gb"] = max(seen["peak_anon_gb"], status.get("RssAnon", 0) / GB)
        seen["peak_rss_gb"] = max(seen["peak_rss_gb"], status.get("VmRSS", 0) / GB)
        seen["min_available_gb"] = min(seen["min_available_gb"], available)
        if available < MIN_AVAILABLE_GB:
            proc.kill()
            seen["killed"] = True
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    seen["returncode"] = proc.returncode
    seen["log_tail"] = "".join(lines)[-1500:]
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", nargs=2, type=int, default=[2, 4], metavar=("DUAL", "SINGLE"))
    parser.add_argument("--work_dir", default="/tmp/flux_real_shapes")
    # bf16 is not the default: this CPU has no native bf16 matmul (AVX2 only), and torch's fallback GEMM took 216 s
    # for the backward of one 3072x3072 int8 layer over 768 tokens, against 0.95 s in fp32 (measured).
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    # glibc's malloc raises its mmap threshold to the size of each large block it frees (up to 32 MiB), after which
    # the step's activations (9-38 MiB each at this width) come from the heap arenas, and what a block frees stays
    # there, fragmented, as anonymous memory the next block does not reuse: measured at 1+2 blocks with
    # checkpointing, live malloc bytes rose 0.16 GiB during the step and the arenas' free bytes 0.69 GiB. A fixed
    # threshold (64 KiB) serves every large tensor by mmap and returns it to the kernel when freed (same step time).
    # 0 keeps glibc's default (dynamic) threshold.
    parser.add_argument("--malloc_mmap_threshold", type=int, default=65536)
    parser.add_argument("--output", default=str(HERE / "results" / "flux_real_shapes.json"))
    parser.add_argument("--arm", nargs=4, help=argparse.SUPPRESS)  # internal: work pipeline data out
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        work, pipeline, data, out = args.arm
        run_arm(Path(work), pipeline, data, args.extra, Path(out))
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(work / "hf_home"), "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    env.setdefault("OMP_NUM_THREADS", "2")
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    t0 = time.perf_counter()
    built = subprocess.run([sys.executable, "-c", "import json, sys; from pathlib import Path; "
                            "sys.path.insert(0, sys.argv[1]); import flux_real_shapes as f; "
                            "print(json.dumps(f.build(Path(sys.argv[2]), (int(sys.argv[3]), int(sys.argv[4])))))",
                            str(HERE), str(work), str(args.depth[0]), str(args.depth[1])],
                           env=env, capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(built.stderr[-3000:])
    paths = json.loads(built.stdout.strip().splitlines()[-1])
    build_s = time.perf_counter() - t0
    extra = ["--mixed_precision", args.mixed_precision] + (["--gradient_checkpointing"] if args.gradient_checkpointing
                                                           else [])
    out = work / "arm.json"
    out.unlink(missing_ok=True)
    before = _meminfo()["MemAvailable"] / GB
    seen = watch([sys.executable, __file__, "--arm", str(work), paths["pipeline"], paths["data"], str(out), "--",
                  *extra], env)
    record = json.loads(out.read_text()) if out.exists() else {}
    transformer = Path(paths["pipeline"]) / "transformer"
    result = {
        "depth": {"dual_blocks": args.depth[0], "single_blocks": args.depth[1]},
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "threads": int(env["OMP_NUM_THREADS"]), "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default",
        "available_at_start_gb": round(before, 2),
        "transformer_on_disk_gb": round(sum(f.stat().st_size for f in transformer.glob("*.safetensors")) / GB, 2),
        "build_s": round(build_s, 1), **{k: v for k, v in seen.items() if k != "log_tail"}, **record,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
    }
    if seen["returncode"] != 0 or record.get("rc"):
        result["log_tail"] = seen["log_tail"]
    print(json.dumps(result, indent=2))
    output = Path(args.output)
    runs = json.loads(output.read_text())["runs"] if output.exists() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"runs": runs + [result]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
