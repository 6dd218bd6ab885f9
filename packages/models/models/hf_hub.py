"""Hugging Face model sources and destinations: a local folder, or a hub repository through
``huggingface_hub`` (its cache to read, its upload API to publish).

``--init-from Qwen/Qwen3-0.6B`` downloads the model's config, tokenizer and safetensors once
into the hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and reads them from
there; with ``HF_HUB_OFFLINE=1`` only the cache is read. Every rank resolves the id itself
(the hub's file locks keep concurrent downloads of the same file apart), before any collective.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# What a model folder needs: config, weights, tokenizer, generation defaults (no pickles, no
# original/ consolidated weights some repos also carry).
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` (one slash, no path syntax): a hub model id rather than a local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and not Path(spec).exists()


def resolve_model_folder(spec: str, flag: str = "--init-from") -> Path:
    """The local folder of ``spec``: the folder itself, or the hub cache's snapshot of a hub id
    (downloaded if missing and the hub is reachable). ValueError, one line, otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not looks_like_hub_id(spec):
        raise ValueError(f"{flag} {spec}: no such folder (give a Hugging Face model folder or a hub id "
                         f"like Qwen/Qwen3-0.6B)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        raise ValueError(f"{flag} {spec}: not in the hub cache and the hub cannot be reached (offline?): "
                         f"download it where the hub is reachable, or pass a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{flag} {spec}: the hub refused it ({first}); check the id, or log in "
                         f"(hf auth login) for a gated model") from None


def pull_model(repo_id: str, out: Path) -> Path:
    """Copy hub model ``repo_id`` (downloaded into the hub cache first if missing) into the plain
    folder ``out``, files not links: a folder to move, edit or archive. ValueError, one line."""
    if not looks_like_hub_id(repo_id):
        raise ValueError(f"pull {repo_id}: not a hub id (owner/name)")
    source = resolve_model_folder(repo_id, flag="pull")
    shutil.copytree(source, out, dirs_exist_ok=True)  # copytree follows the cache's symlinks
    return out


def push_model(folder: Path, repo_id: str, private: bool = False, message: str = "Upload from Meshtron") -> str:
    """Upload model folder ``folder`` (config.json + safetensors, as exported) to hub repository
    ``repo_id``, created if missing; return the commit's URL. Checks the folder before any request."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ValueError(f"push {folder}: not a model folder (config.json and *.safetensors); export a checkpoint "
                         f"with tools/hf_convert.py export first")
    if not looks_like_hub_id(repo_id):
        raise ValueError(f"push to {repo_id}: not a hub id (owner/name)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except HfHubHTTPError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"push to {repo_id}: the hub refused it ({first}); log in with write access "
                         f"(hf auth login)") from None
    return str(getattr(commit, "commit_url", commit))
