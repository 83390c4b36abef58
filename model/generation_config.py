"""Sampling defaults from a checkpoint's generation_config.json, as vLLM's --generation-config."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json fields vLLM applies (max_new_tokens becomes max_tokens).
GENERATION_FIELDS = (
    "repetition_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
)
GENERATION_CONFIG_FILE = "generation_config.json"


def _read_diff(folder: str) -> dict[str, Any]:
    """The file's values that differ from transformers' defaults (vLLM reads to_diff_dict())."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {os.path.join(folder, GENERATION_CONFIG_FILE)}: {e}") from e
    return config.to_diff_dict()


def generation_defaults(
    generation_config: str, model_path: str, override: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Request defaults for sampling fields, keyed by SamplingParams names.

    `generation_config`: "auto" reads the model folder's generation_config.json (none for a .gguf
    file or a folder without one), "vllm" uses none, anything else is a folder holding the file.
    `override` (vLLM's --override-generation-config) is merged on top.
    """
    if generation_config == "vllm":
        config: dict[str, Any] = {}
    elif generation_config == "auto":
        has_file = os.path.isfile(os.path.join(model_path, GENERATION_CONFIG_FILE))
        config = _read_diff(model_path) if has_file else {}
    else:
        path = os.path.join(generation_config, GENERATION_CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--generation-config {generation_config!r} is not auto, vllm or a folder "
                f"holding {GENERATION_CONFIG_FILE} (no {path})"
            )
        config = _read_diff(generation_config)
    override = dict(override or {})
    unknown = sorted(set(override) - set(GENERATION_FIELDS))
    if unknown:
        raise ValueError(
            f"--override-generation-config has unknown fields {unknown}: "
            f"use {', '.join(GENERATION_FIELDS)}"
        )
    config.update(override)
    defaults = {k: config[k] for k in GENERATION_FIELDS if config.get(k) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults
