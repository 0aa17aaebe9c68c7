"""A pipeline's model_index.json, read without loading weights or importing diffusers (a dry run and the family
defaults of `config.build_config` need only the pipeline's class); every failure is one line saying what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.errors import InputError, first_line

if TYPE_CHECKING:
    from ..config.run import ModelConfig


def read_pipeline_index(config: ModelConfig) -> dict:
    """The pipeline's model_index.json, read without loading any weights."""
    source = config.pretrained_model_name_or_path
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise InputError(
                f"pretrained_model_name_or_path: {source} has no model_index.json, so it is not a diffusers "
                "pipeline folder; point --pretrained at a folder saved with save_pretrained"
            )
        try:
            content = json.loads(index.read_text())
            content["_class_name"]
            return content
        except (json.JSONDecodeError, KeyError):
            raise InputError(f"pretrained_model_name_or_path: {index} is not a valid model_index.json; "
                             "re-save the pipeline") from None
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise InputError(f"pretrained_model_name_or_path: folder {source} not found; pass an existing pipeline "
                         "folder or a Hub id like facebook/DiT-XL-2-256")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise InputError(f"pretrained_model_name_or_path: {source!r} is neither a folder nor a Hub id; "
                         "pass e.g. facebook/DiT-XL-2-256") from None
    path = _hub_file(source, "model_index.json", config.revision)
    try:
        return dict(json.loads(Path(path).read_text()))
    except json.JSONDecodeError:
        raise InputError(f"pretrained_model_name_or_path: {source}'s model_index.json is not valid JSON; "
                         "re-download it") from None


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str:
    """Fetch (or find in the local cache) one file of a Hub model; every failure is one line saying what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"pretrained_model_name_or_path: {repo_id}" + (f" (revision {revision})" if revision else "")
    fetch = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise InputError(
                f"{where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode is on "
                f"(HF_HUB_OFFLINE=1); fetch it with {fetch} on a connected machine and copy the cache here, "
                "or unset HF_HUB_OFFLINE"
            ) from None
        raise InputError(f"{where} is not in the local Hugging Face cache and the Hub cannot be reached; check "
                         f"your network (or fetch it with {fetch} where there is one)") from None
    except GatedRepoError:
        raise InputError(f"{where} is a gated model and this request has no access to it; accept its terms on "
                         f"https://huggingface.co/{repo_id}, then log in with `hf auth login` or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise InputError(f"{where}: no such revision on the Hub; pass an existing branch, tag or commit to "
                         "--revision") from None
    except RepositoryNotFoundError:  # also what a private model answers without a (valid) token
        raise InputError(f"{where} is not on the Hub, or it is private and no valid token was sent; check the id, "
                         "or log in with `hf auth login` / set HF_TOKEN") from None
    except EntryNotFoundError:
        raise InputError(f"{where} has no {filename}, so it is not a diffusers pipeline; pass a diffusers "
                         "pipeline repo") from None
    except Exception as e:  # network errors and the like: one line, not a traceback
        raise InputError(f"{where}: cannot read {filename} from the Hub ({first_line(e)}); check the id and "
                         "your network") from None
