"""Model arguments → local paths: a folder or .gguf file as given, else a Hugging Face repo id
looked up in the local hub cache (never downloaded: no network at run time)."""

from __future__ import annotations

import glob
import os

PATH_PREFIXES = ("/", "./", "../", "~")


def is_local_path(model: str) -> bool:
    """A model argument that names a file or folder (existing or not), not a repo id."""
    return os.path.exists(model) or model.startswith(PATH_PREFIXES) or model.endswith(".gguf")


def resolve_model_path(
    model: str, revision: str | None = None, download_dir: str | None = None
) -> str:
    """A local path for `model`: itself if it is a path, else the cached snapshot of the repo id.

    Raises FileNotFoundError naming the cache folder and revision when the repo is not cached,
    and ValueError when `model` is neither a path nor a valid repo id.
    """
    if is_local_path(model):
        return model
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    # --download-dir, else $HF_HUB_CACHE, else $HF_HOME/hub
    cache = os.path.expanduser(download_dir or constants.HF_HUB_CACHE)
    try:
        snapshot = snapshot_download(
            model, revision=revision, cache_dir=cache, local_files_only=True
        )
    except HFValidationError as e:
        raise ValueError(
            f"model {model!r} is neither an existing path nor a Hugging Face repo id: {e}"
        ) from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        folder = os.path.join(cache, "models--" + model.replace("/", "--"))
        raise FileNotFoundError(
            f"model {model!r} is not a local path and not in the Hugging Face cache: looked for "
            f"revision {revision or 'main'} in {folder} (cache {cache}; set HF_HOME, HF_HUB_CACHE "
            f"or --download-dir). tokenmill does not download: fetch it first, e.g. "
            f"`huggingface-cli download {model}`"
        ) from None
    return _checkpoint_in(snapshot)


def _checkpoint_in(snapshot: str) -> str:
    """A snapshot with config.json is an HF folder; one with a single .gguf and no config is it."""
    if os.path.isfile(os.path.join(snapshot, "config.json")):
        return snapshot
    ggufs = sorted(glob.glob(os.path.join(snapshot, "*.gguf")))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise ValueError(
            f"{snapshot} holds several GGUF files ({names}): pass the path of the one to serve"
        )
    return snapshot  # the loader names what is missing
