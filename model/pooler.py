"""Pooling for `--runner pooling`: hidden states -> one embedding per prompt (last token, mean or
CLS, then L2-normalized or not), configured from sentence-transformers files or --pooler-config."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from model.inputs import POOLING_TYPES  # the step's wire codes

# sentence-transformers' pooling modes (1_Pooling/config.json: v6's `pooling_mode`, or before it
# one `pooling_mode_<mode>` flag each) -> our pooling type
_ST_MODES = {"lasttoken": "LAST", "mean": "MEAN", "cls": "CLS"}
_ST_FLAGS = {"pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_tokens": "mean"}
_ST_FLAGS |= {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_ST_FLAGS |= {"pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}
_ST_FLAGS |= {"pooling_mode_weightedmean_tokens": "weightedmean"}


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """vLLM's --pooler-config shape: pooling_type and normalize."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}"
            )

    @property
    def needs_every_position(self) -> bool:
        """MEAN and CLS read positions a prefix-cache hit would skip; LAST reads only the last."""
        return self.pooling_type != "LAST"


def load_pooler_config(model_path: str, override: dict[str, Any] | None = None) -> PoolerConfig:
    """The model folder's sentence-transformers pooling (LAST, normalized, without one), with
    `override` (--pooler-config) taking precedence field by field."""
    found = _sentence_transformers_pooling(model_path) if os.path.isdir(model_path) else {}
    merged = found | dict(override or {})
    unknown = set(merged) - {"pooling_type", "normalize"}
    if unknown:
        raise ValueError(
            f"--pooler-config has unknown keys {sorted(unknown)}; it takes pooling_type, normalize"
        )
    kind = str(merged.get("pooling_type", "LAST")).upper()
    normalize = merged.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"--pooler-config normalize must be true or false, got {normalize!r}")
    return PoolerConfig(kind, normalize)


def _sentence_transformers_pooling(path: str) -> dict[str, Any]:
    """pooling_type and normalize from modules.json and its Pooling module's config.json."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return {}
    with open(modules_file, encoding="utf-8") as f:
        modules = json.load(f)
    # NOTE: module types moved between versions (models.Pooling, ...modules.pooling.Pooling)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    out: dict[str, Any] = {"normalize": "Normalize" in kinds}
    for m, kind in zip(modules, kinds, strict=True):
        if kind != "Pooling":
            continue
        with open(os.path.join(path, m.get("path", ""), "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        modes = cfg.get("pooling_mode") or [v for k, v in _ST_FLAGS.items() if cfg.get(k)]
        modes = [modes] if isinstance(modes, str) else list(modes)
        if len(modes) != 1 or modes[0] not in _ST_MODES:
            raise ValueError(
                f"{m.get('path')}/config.json pools by {modes}; tokenmill pools by exactly one "
                "of lasttoken, mean or cls"
            )
        out["pooling_type"] = _ST_MODES[modes[0]]
    return out


def as_base_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint saved as its base model (`Qwen2Model`, as sentence-transformers saves a
    decoder) is built as its causal-LM class, without the head (the pooling runner drops it)."""
    archs = config.get("architectures") or []
    if archs and archs[0].endswith("Model") and not archs[0].endswith("ForCausalLM"):
        config = dict(config, architectures=[archs[0].removesuffix("Model") + "ForCausalLM"])
    return config


def with_model_prefix(stream: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """A base model's tensors (`layers.0...`, no `model.` prefix) named as the causal LM's."""
    for name, tensor in stream:
        if name.startswith(("model.", "lm_head.")):
            yield name, tensor
        else:
            yield "model." + name, tensor


def pool_chunk(hidden: torch.Tensor, pooling_type: str, is_first: bool, is_last: bool) -> list:
    """One chunk's share of the pooled vector ([] if the chunk holds none): see StepOutput."""
    # hidden: [chunk_len, hidden_size]
    if pooling_type == "MEAN":
        return hidden.float().sum(dim=0).tolist()
    if pooling_type == "LAST":
        return hidden[-1].float().tolist() if is_last else []
    return hidden[0].float().tolist() if is_first else []


def add_chunk(acc: list[float] | None, part: list[float], pooling_type: str) -> list[float] | None:
    """Fold one chunk's share into the running value (MEAN: a sum; LAST and CLS: the one row)."""
    if not part:
        return acc
    if pooling_type == "MEAN" and acc is not None:
        return [a + b for a, b in zip(acc, part, strict=True)]
    return list(part)


def finish(acc: list[float], num_tokens: int, config: PoolerConfig) -> list[float]:
    """The embedding: MEAN divides the sum by the token count; then L2-normalize if configured."""
    v = torch.tensor(acc, dtype=torch.float64)  # [hidden_size]
    if config.pooling_type == "MEAN":
        v = v / num_tokens
    if config.normalize:
        v = torch.nn.functional.normalize(v, dim=0)
    return v.float().tolist()
