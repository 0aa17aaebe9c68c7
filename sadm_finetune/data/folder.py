"""An image folder as training data, with the conventions fine-tuners use (README, Personalization).

- **Captions**, per image, from the first source that has one: a sidecar file beside the image with the same
  stem (`a.png` -> `a.txt`, `--caption_extension`; its first line, as kohya's sd-scripts read it), a
  `metadata.jsonl` line (`file_name`, `--caption_column`: the `datasets` imagefolder format), the name of a kohya
  `<N>_<name>` folder (`<name>`, kohya's class tokens), then `--instance_prompt` (DreamBooth's one prompt).
  `--caption_prefix` goes in front of each (kohya's `caption_prefix`). When some images have a caption and one
  has none, the run stops naming it; when none has any, the folder is unconditional or has class subfolders.
- **Class subfolders**: with no caption anywhere, images one level down in subfolders get one class id per
  subfolder (sorted names -> 0..K-1), as before.
- **Repeats**: subfolders all named `<N>_<name>` (kohya's DreamBooth layout, e.g. `10_sks dog/`) repeat their
  images N times per epoch (a folder with N < 1 stops the run: kohya skips it silently); `--dataset_repeats`
  multiplies every count. Repeats are rows: a repeated image is drawn (cropped, flipped, noised) afresh each time.
- **Masks**: `<stem>_mask.<ext>` beside an image is its loss mask (white trains, black is ignored; grey weighs
  in between), read in `data.TrainDataset`; such files are not training images.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config.run import DataConfig
from ..utils.errors import InputError

MASK_SUFFIX = "_mask"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")  # kohya's <repeats>_<class tokens>


@dataclass
class FolderImage:
    path: Path
    top: str | None  # the first-level subfolder it sits in (None: the root)
    caption: str | None = None
    source: str | None = None  # where the caption came from: sidecar, metadata, folder, instance_prompt
    repeats: int = 1
    folder_caption: str | None = None  # a kohya folder's <name>
    mask: Path | None = None


def join_prefix(prefix: str | None, caption: str) -> str:
    """`caption_prefix` + " " + caption, as kohya's process_caption joins them (no doubled space)."""
    if not prefix:
        return caption
    return f"{prefix} {caption}".strip() if caption else prefix


def instance_caption(cfg: DataConfig) -> str | None:
    """The caption an image gets from `--instance_prompt`, prefix included: the default validation prompt."""
    return join_prefix(cfg.caption_prefix, cfg.instance_prompt) if cfg.instance_prompt else None


def scan_images(root: Path, extensions: set[str]) -> tuple[list[Path], dict[Path, Path]]:
    """The images under root (sorted, hidden files left out) and image -> its `<stem>_mask.<ext>` file. A file named
    `x_mask.png` is a mask only where an image `x.*` sits beside it."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    by_stem = {(p.parent, p.stem): p for p in files}
    masks: dict[Path, Path] = {}
    for p in files:
        if p.stem.endswith(MASK_SUFFIX):
            image = by_stem.get((p.parent, p.stem[:-len(MASK_SUFFIX)]))
            if image is not None and image != p:
                masks[image] = p
    mask_files = set(masks.values())
    return [p for p in files if p not in mask_files], masks


def _read_sidecar(image: Path, extension: str) -> str | None:
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"train_data_dir: caption file {path} is not UTF-8 text; save it as UTF-8") from None
    if not lines:
        raise InputError(f"train_data_dir: caption file {path} is empty; write the caption on its first line or "
                         "delete the file")
    return lines[0].strip()


def _read_metadata(root: Path, column: str | None) -> dict[Path, str]:
    """image path -> caption from root/metadata.jsonl (lines without `column` give none)."""
    path = root / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions: dict[Path, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"train_data_dir: {path} line {number} is not a JSON object with a file_name; fix the "
                             "line (the datasets imagefolder format)") from None
        value = row.get(column) if column else None
        if value is not None:
            if not isinstance(value, str):
                raise InputError(f"caption_column: {path} line {number} holds a {type(value).__name__} under "
                                 f"{column!r}, not a caption; write the caption as a string")
            captions[(root / name).resolve()] = value
    return captions


def _kohya_repeats(root: Path, images: list[FolderImage]) -> bool:
    """Set each image's repeats and folder caption from its kohya `<N>_<name>` subfolder; whether the layout is
    kohya's (every first-level subfolder so named)."""
    tops = sorted({image.top for image in images if image.top is not None})
    kohya = [top for top in tops if KOHYA_FOLDER.match(top)]
    if not kohya:
        return False
    others = [top for top in tops if top not in kohya]
    if others:
        raise InputError(f"train_data_dir: subfolders {others[:3]} of {root} are not named <repeats>_<name> like "
                         f"{kohya[0]!r}; name every image subfolder so (kohya's layout) or none (one class each)")
    for top in kohya:
        repeats = KOHYA_FOLDER.match(top).group(1)
        if int(repeats) < 1:
            raise InputError(f"train_data_dir: folder {root / top} repeats its images {int(repeats)} times (kohya's "
                             "<repeats>_<name> name); use 1 or more, or move the folder out")
    for image in images:
        if image.top is not None:
            repeats, name = KOHYA_FOLDER.match(image.top).groups()
            image.repeats = int(repeats)
            image.folder_caption = name
    return True


def read_folder(root: Path, cfg: DataConfig, extensions: set[str]) -> tuple[list[FolderImage], bool, bool]:
    """The folder's images with their caption (prefixed), repeats and mask; whether the layout is kohya's; whether any
    image has a caption."""
    files, masks = scan_images(root, extensions)
    if not files:
        raise InputError(
            f"train_data_dir: no images ({', '.join(sorted(extensions))}) found in {root}; add images, one "
            "subfolder per class"
        )
    images = [FolderImage(path, p[0] if len(p := path.relative_to(root).parts) > 1 else None, mask=masks.get(path))
              for path in files]
    kohya = _kohya_repeats(root, images)
    metadata = _read_metadata(root, cfg.caption_column)
    for image in images:
        sources = (("sidecar", _read_sidecar(image.path, cfg.caption_extension)),
                   ("metadata", metadata.get(image.path.resolve())),
                   ("folder", image.folder_caption),
                   ("instance_prompt", cfg.instance_prompt))
        image.source, image.caption = next(((s, c) for s, c in sources if c is not None), (None, None))
    captioned = any(image.caption is not None for image in images)
    if captioned:
        missing = next((image for image in images if image.caption is None), None)
        if missing is not None:
            sidecar = missing.path.with_suffix(cfg.caption_extension).name
            raise InputError(
                f"train_data_dir: image {missing.path} has no caption (no {sidecar} beside it, no metadata.jsonl line) "
                "while other images have one; caption it, or pass --instance_prompt for the uncaptioned ones")
    elif cfg.caption_prefix:  # trigger words alone: the prefix is every image's caption
        for image in images:
            image.caption, image.source = "", "caption_prefix"
        captioned = True
    if captioned:
        for image in images:
            image.caption = join_prefix(cfg.caption_prefix, image.caption)
    return images, kohya, captioned


def describe_folder(root: Path, images: list[FolderImage], kohya: bool, kind: str) -> str:
    """What the run summary and the card say about the folder: captions by source, repeats, masks."""
    parts = [kind]
    sources: dict[str, int] = {}
    for image in images:
        if image.source:
            sources[image.source] = sources.get(image.source, 0) + 1
    if sources:
        parts.append("captions from " + ", ".join(f"{name} ({count})" for name, count in sources.items()))
    if kohya:
        folders = sorted({(image.top, image.repeats) for image in images if image.top is not None})
        parts.append("kohya folders " + ", ".join(f"{top} (x{n})" for top, n in folders))
    masked = sum(image.mask is not None for image in images)
    if masked:
        parts.append(f"{masked} of {len(images)} images masked")
    return f"image folder {root} ({'; '.join(parts)})"
