"""sadm-eval: sample a pipeline class by class and compare the samples with a reference image set.

    sadm-eval --pipeline out/ --reference_dataset builtin:digits --features digits --output_json eval.json

Reports FID, KID, improved precision/recall (in the chosen feature space) and, with a classifier, the
share of samples classified as the class they were drawn for. Batch ``i`` is sampled with seed
``seed + i``, so ``--compare_with`` (or a later run on another pipeline) sees the same noise and labels.
"""

from __future__ import annotations

from .. import cpu_wait  # noqa: F401  (first: OMP_WAIT_POLICY before anything imports torch)

import argparse
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from ..utils.errors import ConfigError, InputError, SADMError, first_line
from .grid import display_name, write_grid
from ..config.flags import FlagParser, add_dataclass_flags
from ..utils.quiet import silence_known_noise
from .reference import Reference, open_reference


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    pipeline: str = field(metadata={"help": "Pipeline to evaluate: Hub id or folder (safetensors weights only)."})
    reference_dir: str | None = _f(None, "Reference image folder; one subfolder per class, ids by sorted name.")
    reference_dataset: str | None = _f(None, "Reference `datasets` name or local folder, or builtin:digits.")
    reference_split: str = _f("train", "Split of --reference_dataset.")
    image_column: str = _f("image", "Image column of --reference_dataset.")
    label_column: str | None = _f("label", "Label column of --reference_dataset ('none': unlabelled).")
    max_reference_images: int | None = _f(None, "Use a fixed random subset of this many reference images.")
    samples_per_class: int = _f(50, "Images generated per class id.")
    num_inference_steps: int = _f(50, "Sampler steps per image.")
    guidance_scale: float = _f(1.0, "Classifier-free guidance scale (1: none; the DiT paper's FID uses 1.5).")
    prompt_template: str = _f("{label}", "Prompt for text-to-image pipelines, formatted with the class name.")
    seed: int = _f(0, "Base seed; batch i is sampled with seed + i.")
    batch_size: int = _f(32, "Images per pipeline call and per feature batch.")
    features: str = _f("inception", "Feature space: inception, digits, a classifier folder or an Inception .pt file.")
    classifier: str | None = _f(None, "Classifier folder or 'digits' for label accuracy (builtin:digits: digits).")
    reference_stats_cache: str | None = _f(None, ".npz cache of reference features; written when missing.")
    output_json: str | None = _f(None, "Write the results here as JSON.")
    grid: str | None = _f(None, "Write a PNG grid of samples (rows: classes); side by side with --compare_with.")
    compare_with: str | None = _f(None, "Second pipeline (e.g. the base), sampled with the same seeds and labels.")
    update_model_card: str | None = _f(None, "Folder whose README.md model card gets the metrics in its model-index.")
    probe_images: int = _f(64, "Reference images for the structure probe by noise level (0: no probe).")
    probe_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900],
                                       metadata={"help": "Noise levels (training timesteps) the probe measures."})
    device: str | None = _f(None, "torch device (default: cuda when available, else cpu).")
    dtype: Literal["float32", "float16", "bfloat16"] = _f("float32", "Pipeline weight dtype.")
    sampler: Literal["pipeline", "euler", "ddpm"] = _f(
        "pipeline", "Sampler: the pipeline's own scheduler, or Euler (EulerDiscreteScheduler, deterministic; not for "
        "DiTPipeline, which does not scale its first latents for it) or DDPM "
        "(ancestral; its step noise seeded from --seed per batch) built from its config: a second sampler shows "
        "whether a FID difference holds beyond one sampler.")

    def __post_init__(self) -> None:
        if not self.pipeline:
            raise ConfigError("--pipeline", "is empty", "pass a Hub id or a pipeline folder")
        if (self.reference_dir is None) == (self.reference_dataset is None):
            raise ConfigError("--reference_dir", "give exactly one of --reference_dir and --reference_dataset",
                              "e.g. --reference_dataset builtin:digits")
        try:
            self.prompt_template.format(label="x")
        except (KeyError, IndexError, ValueError):
            raise ConfigError("--prompt_template", f"{self.prompt_template!r} is not a format string with only "
                              "{label}", "e.g. 'a photo of a {label}'") from None
        for name in ("samples_per_class", "num_inference_steps", "batch_size", "max_reference_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name}", f"must be >= 1, got {getattr(self, name)}", "pass a positive number")


# ----------------------------------------------------------------------------------------------
# Sampling


def load_pipeline(source: str, flag: str, device: str, dtype: str, revision: str | None = None,
                  variant: str | None = None):
    """Stock ``DiffusionPipeline.from_pretrained``: safetensors only, no remote code."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        if is_lora_output(path):
            return load_lora_output(path, flag, device, dtype)
        raise InputError(f"{flag}: {source} has no model_index.json; pass a folder saved with save_pretrained (or a "
                         "LoRA run's output folder)")
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise InputError(f"{flag}: folder {source} not found; pass a pipeline folder or a Hub id")
    bars_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # keep stderr for sampling progress and errors
    try:
        pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=True, dtype=getattr(torch, dtype),
                                                 revision=revision, variant=variant)
    except Exception as e:  # missing repo, offline, pickle-only weights: one line, not a traceback
        raise InputError(f"{flag}: cannot load {source} ({first_line(e)}); check the id or folder (safetensors "
                         "weights)") from None
    finally:
        if bars_on:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_lora_output(path: Path) -> bool:
    """A LoRA run's lean output: the diffusers LoRA file and the run's config, no pipeline of its own."""
    from ..tuners.lora import LORA_WEIGHT_NAME

    return (path / LORA_WEIGHT_NAME).is_file() and (path / "training_config.yaml").is_file()


def load_lora_output(path: Path, flag: str, device: str, dtype: str):
    """The base pipeline named in the run's training_config.yaml (its revision, variant and separate VAE), with the
    run's LoRA file applied by the pipeline's own `load_lora_weights`: what the run's card tells users to do."""
    import torch

    from ..config.run import build_config, load_yaml

    try:
        model = build_config(load_yaml(path / "training_config.yaml")).model
    except Exception as e:
        raise InputError(f"{flag}: {path}/training_config.yaml cannot be read ({first_line(e)})") from None
    base = model.pretrained_model_name_or_path
    pipe = load_pipeline(base, f"{flag} (the LoRA's base {base})", "cpu", dtype, model.revision, model.variant)
    if model.pretrained_vae_model_name_or_path:
        from ..families.vae import load_separate_vae

        pipe.vae = load_separate_vae(model, type(pipe.vae)).to(getattr(torch, dtype))
    if not hasattr(pipe, "load_lora_weights"):
        raise InputError(f"{flag}: {type(pipe).__name__} has no load_lora_weights; evaluate the run's merged export")
    pipe.load_lora_weights(str(path))
    return pipe.to(device)


def use_sampler(pipe, name: str):
    """Swap the pipeline's scheduler for `name` (built from the scheduler's own config: same betas)."""
    if name == "pipeline":
        return pipe
    from diffusers import DDPMScheduler, DiTPipeline, EulerDiscreteScheduler

    if name == "euler" and isinstance(pipe, DiTPipeline):  # measured: FID 114 where DDIM gives 8 (digits study)
        raise InputError("--sampler: euler needs its first latents scaled by the scheduler's init_noise_sigma, which "
                         "DiTPipeline never does; use --sampler ddpm for a second sampler on DiT")

    cls = {"euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def pipeline_class_names(pipe) -> dict[int, str] | None:
    """Class id -> name from the pipeline's id2label (DiTPipeline keeps it as ``labels``: name -> id)."""
    id2label = pipe.config.get("id2label") if hasattr(pipe.config, "get") else None
    if id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    names: dict[int, str] = {}
    for name, class_id in (getattr(pipe, "labels", None) or {}).items():
        names.setdefault(int(class_id), name)
    return names or None


def generate(pipe, class_labels: list[int], prompts: list[str] | None, config: EvalConfig) -> Iterator[np.ndarray]:
    """Yield uint8 ``(B, H, W, 3)`` batches; batch ``i`` uses a CPU generator seeded ``seed + i``."""
    import torch
    from tqdm.auto import tqdm

    starts = range(0, len(class_labels), config.batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc="sampling", leave=False)):
        stop = start + config.batch_size
        condition = {"class_labels": class_labels[start:stop]} if prompts is None else {"prompt": prompts[start:stop]}
        if config.sampler == "ddpm":  # DiTPipeline does not pass its generator to the scheduler's step noise
            torch.manual_seed(config.seed + batch_index)
        images = pipe(**condition, num_inference_steps=config.num_inference_steps,
                      guidance_scale=config.guidance_scale, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(config.seed + batch_index)).images
        yield (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)  # as numpy_to_pil


@dataclass
class Samples:
    features: np.ndarray  # (N, D)
    predictions: np.ndarray | None  # (N,) the classifier's class ids
    grid: np.ndarray  # (rows, cols, H, W, 3) uint8: the first samples of the first classes


def sample_features(pipe, class_labels: list[int], prompts: list[str] | None, config: EvalConfig, extractor,
                    classifier=None, grid_rows: int = 10, grid_cols: int = 8) -> Samples:
    """Sample batch by batch, keeping features and predictions but only the images a grid shows."""
    spc = config.samples_per_class
    rows, cols = min(grid_rows, len(class_labels) // spc), min(grid_cols, spc)
    features, predictions, kept = [], [], []
    start = 0
    for images in generate(pipe, class_labels, prompts, config):
        features.append(extractor(images))
        if classifier is not None:
            predictions.append(classifier.predict(images))
        index = np.arange(start, start + len(images))  # class-major: class position index // spc
        kept.append(images[(index // spc < rows) & (index % spc < cols)])
        start += len(images)
    grid = np.concatenate(kept).reshape(rows, cols, *kept[0].shape[1:])
    return Samples(np.concatenate(features), np.concatenate(predictions) if predictions else None, grid)


def _conditions(pipe, reference: Reference, config: EvalConfig) -> tuple[list[int], list[str] | None, dict[int, str]]:
    """The class id of every sample (class-major), its prompt for text pipelines, and the class names."""
    params = inspect.signature(pipe.__call__).parameters
    names = pipeline_class_names(pipe) if "class_labels" in params else None
    if names is None and reference.labels is not None:
        names = {int(i): reference.label_names[int(i)] for i in np.unique(reference.labels)}
    if names is None:
        raise InputError("--pipeline: it has no id2label and the reference set has no labels; use a reference "
                         "with one subfolder per class (or --label_column)")
    if reference.labels is not None:  # sample the classes the reference holds (e.g. a transfer domain's)
        present = {int(i) for i in np.unique(reference.labels)}
        if not present & set(names):
            raise InputError(f"--reference: its class ids {sorted(present)[:10]} are none of the pipeline's "
                             f"{sorted(names)[:10]}; use a reference labelled with the pipeline's class ids")
        names = {c: n for c, n in names.items() if c in present}
    class_labels = [c for c in sorted(names) for _ in range(config.samples_per_class)]
    if "class_labels" in params:
        return class_labels, None, names
    if "prompt" in params:
        return class_labels, [config.prompt_template.format(label=names[c]) for c in class_labels], names
    raise InputError(f"--pipeline: {type(pipe).__name__} takes neither class_labels nor prompt; "
                     "sadm-eval samples class-conditional and text-to-image pipelines")


# ----------------------------------------------------------------------------------------------
# Metrics and outputs


def compute_metrics(reference_features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray,
                    device: str = "cpu") -> dict:
    """FID against the reference Gaussian; KID and precision/recall against the reference features."""
    from .metrics import feature_statistics, frechet_distance, kid, precision_recall, structure_gap

    kid_mean, kid_std = kid(reference_features, features)
    precision, recall = precision_recall(reference_features, features, device=device)
    fid = frechet_distance(*feature_statistics(features), mu, sigma)
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
            "structure_gap": structure_gap(reference_features, features)}


def _reference_stats(reference: Reference, extractor, resolution: int, config: EvalConfig):
    from .metrics import ReferenceStats, feature_statistics, load_reference_stats, save_reference_stats

    key = (f"features={extractor.name}; reference={reference.description}; resolution={resolution}; "
           f"max_images={config.max_reference_images}")
    cache = Path(config.reference_stats_cache) if config.reference_stats_cache else None
    if cache is not None and cache.exists():
        try:
            return load_reference_stats(cache, expected_key=key)
        except (ValueError, OSError) as e:
            raise InputError(f"--reference_stats_cache: {e}") from None
    indices = np.arange(reference.num_images)
    if config.max_reference_images is not None and config.max_reference_images < reference.num_images:
        # Seeded apart from --seed, so the reference subset stays the same across sampling seeds.
        rng = np.random.default_rng(0)
        indices = np.sort(rng.choice(reference.num_images, config.max_reference_images, replace=False))
    chunks = np.array_split(indices, -(-len(indices) // 1000))  # bounded memory for large reference sets
    features = np.concatenate([extractor(reference.load(chunk, resolution)) for chunk in chunks])
    labels = None if reference.labels is None else reference.labels[indices]
    if cache is not None:
        return save_reference_stats(cache, features, key, labels)
    return ReferenceStats(key, *feature_statistics(features), features, labels)


def _load_extractor(spec: str, flag: str, config: EvalConfig, device: str):
    from .features import build_feature_extractor

    try:
        return build_feature_extractor(spec, batch_size=config.batch_size, device=device)
    except (ValueError, OSError, TypeError) as e:
        raise InputError(f"{flag}: {e}") from None


def _model_card_path(folder: str) -> Path:
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        raise InputError(f"--update_model_card: {readme} not found; point it at an exported pipeline folder")
    return readme


def update_model_card(folder: str, result: dict) -> Path:
    """Add the metrics to the card's ``model-index``, replacing earlier results with the same settings."""
    from huggingface_hub import EvalResult, ModelCard

    readme = _model_card_path(folder)
    card = ModelCard.load(readme)
    args = {k: result[k] for k in ("num_samples", "num_inference_steps", "guidance_scale", "seed", "features")}
    task_type, task_name = {"class_labels": ("image-generation", "Class-conditional image generation"),
                            "prompt": ("text-to-image", "Text-to-image")}[result["conditioning"]]
    names = {"fid": f"FID ({result['features']} features)", "kid_mean": f"KID ({result['features']} features)",
             "precision": f"Precision ({result['features']} features)",
             "recall": f"Recall ({result['features']} features)",
             "label_accuracy": f"Label accuracy ({result['classifier']} classifier)"}
    new = [
        EvalResult(task_type=task_type, task_name=task_name,
                   dataset_type=result["reference_type"], dataset_name=result["reference_name"],
                   metric_type=key.removesuffix("_mean"), metric_value=round(value, 6),
                   metric_name=names[key], metric_args=args)
        for key, value in result["metrics"].items() if key in names
    ]
    old = [r for r in card.data.eval_results or [] if not any(r.is_equal_except_value(n) for n in new)]
    card.data.eval_results = old + new
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    card.save(readme)
    return readme


def format_table(result: dict) -> str:
    columns = [("pipeline", {**result["metrics"], "probe": result.get("probe")})]
    if "compare_with" in result:
        columns.append(("compare_with", {**result["compare_with"]["metrics"], "probe": result["compare_with"].get("probe")}))
    rows = [("FID", lambda m: f"{m['fid']:.3f}"), ("KID", lambda m: f"{m['kid_mean']:.4g} ± {m['kid_std']:.2g}"),
            ("precision", lambda m: f"{m['precision']:.3f}"), ("recall", lambda m: f"{m['recall']:.3f}"),
            ("structure gap", lambda m: f"{m['structure_gap']:.4f}")]
    if "label_accuracy" in result["metrics"]:
        rows.append(("label accuracy", lambda m: f"{m['label_accuracy']:.3f}"))
    lines = [f"{result['num_samples']} samples ({result['samples_per_class']} per class x {result['num_classes']} "
             f"classes), {result['num_inference_steps']} steps, guidance {result['guidance_scale']}, seed "
             f"{result['seed']}; reference {result['reference_name']} ({result['num_reference_images']} images); "
             f"features {result['features']}",
             "| metric | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    if result.get("probe"):
        timesteps = result["probe"]["timesteps"]
        for i, t in enumerate(timesteps):
            rows.append((f"structure gap, fixed encoder, t={t}",
                         lambda m, i=i: f"{m['probe']['structure_gap_fixed'][i]:.3g}"))
        for i, t in enumerate(timesteps):
            rows.append((f"D pair cosine (1: D cannot tell), t={t}",
                         lambda m, i=i: "no D" if m["probe"]["d_pair_cos"] is None else f"{m['probe']['d_pair_cos'][i]:.3f}"))
    lines += [f"| {label} | " + " | ".join(fmt(m) for _, m in columns) + " |" for label, fmt in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry points


def _load_extractors(config: EvalConfig, device: str):
    """The feature extractor and, when there is one, the classifier for label accuracy."""
    from ..data.digits import DIGITS_NAME

    extractor = _load_extractor(config.features, "--features", config, device)
    digits_reference = DIGITS_NAME in (config.reference_dataset, config.reference_dir)
    classifier_spec = config.classifier or ("digits" if digits_reference else None)
    if classifier_spec is None:
        return extractor, None
    same = classifier_spec == config.features
    classifier = extractor if same else _load_extractor(classifier_spec, "--classifier", config, device)
    if not hasattr(classifier, "predict"):
        raise InputError(f"--classifier: {classifier_spec} gives features but no logits; pass a classifier folder")
    return extractor, classifier


def _write_outputs(config: EvalConfig, result: dict, samples: dict[str, Samples]) -> None:
    if config.output_json:
        Path(config.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output_json).write_text(json.dumps(result, indent=2) + "\n")
    if config.grid:
        order = ["compare_with", "pipeline"] if config.compare_with else ["pipeline"]  # base left, tuned right
        write_grid(config.grid, [samples[key].grid for key in order],
                   [display_name(getattr(config, key)) for key in order] if config.compare_with else None)
    if config.update_model_card:
        update_model_card(config.update_model_card, result)


def evaluate_pipeline(config: EvalConfig) -> dict:
    """Sample, extract features, compute the metrics, write the requested outputs; return the results."""
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference = open_reference(config)  # input errors first, before any weights are loaded
    if config.update_model_card:
        _model_card_path(config.update_model_card)
    extractor, classifier = _load_extractors(config, device)
    pipelines = {"pipeline": load_pipeline(config.pipeline, "--pipeline", device, config.dtype)}
    if config.compare_with:
        pipelines["compare_with"] = load_pipeline(config.compare_with, "--compare_with", device, config.dtype)
    pipelines = {key: use_sampler(pipe, config.sampler) for key, pipe in pipelines.items()}

    class_labels, prompts, names = _conditions(pipelines["pipeline"], reference, config)
    samples = {key: sample_features(pipe, class_labels, prompts, config, extractor, classifier)
               for key, pipe in pipelines.items()}
    stats = _reference_stats(reference, extractor, samples["pipeline"].grid.shape[2], config)
    results = {}
    for key, sampled in samples.items():
        results[key] = compute_metrics(stats.features, stats.mu, stats.sigma, sampled.features, device)
        if sampled.predictions is not None:
            results[key]["label_accuracy"] = float((sampled.predictions == np.asarray(class_labels)).mean())

    probes = {}
    if config.probe_images > 0:
        from ..terms.sadm.probe import probe_reference  # SADM's structure probe

        probes = {key: probe_reference(pipe, getattr(config, key), reference, names, prompts is not None, config, device)
                  for key, pipe in pipelines.items()}

    result = {
        "pipeline": config.pipeline, "conditioning": "class_labels" if prompts is None else "prompt",
        "reference": reference.description, "reference_name": reference.name, "reference_type": reference.dataset_type,
        "features": extractor.name, "classifier": None if classifier is None else classifier.name,
        "num_samples": len(class_labels), "samples_per_class": config.samples_per_class, "num_classes": len(names),
        "num_reference_images": len(stats.features), "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale, "seed": config.seed, "sampler": config.sampler,
        "metrics": results["pipeline"],
    }
    if probes:  # by noise level, beside the scalar metrics
        result["probe"] = probes["pipeline"]
    if config.compare_with:
        result["compare_with"] = {"pipeline": config.compare_with, "metrics": results["compare_with"]}
        if probes:
            result["compare_with"]["probe"] = probes["compare_with"]
    _write_outputs(config, result, samples)
    return result


USAGE = ("sadm-eval --pipeline PIPELINE (--reference_dir DIR | --reference_dataset NAME) [--<field> VALUE ...]"
         "   (sadm-eval --help lists every field)")


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``EvalConfig`` field, typed from its annotation (the builder sadm-train uses too)."""
    parser = FlagParser(prog="sadm-eval", usage=USAGE, description=__doc__.strip().splitlines()[0])
    add_dataclass_flags(parser, {"evaluation": EvalConfig})
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_known_noise()
    try:
        config = EvalConfig(**vars(build_parser().parse_args(argv)))
        result = evaluate_pipeline(config)
    except SADMError as e:
        print(f"sadm-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
