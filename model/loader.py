"""load_weights: format-agnostic; applies the packed mapping and each parameter's weight_loader."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

# checkpoint tensors we recompute ourselves
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# one routed expert's tensor: ...mlp.experts.E.gate_proj.weight (model.expert_params_mapping)
EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.(\w+)\.")


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: names the unexpected or missing tensors."""


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _complete(param: nn.Parameter, got: set) -> bool:
    """Every shard arrived (a stacked expert weight: every part of every expert)."""
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    if hasattr(owner, "is_loaded"):
        return owner.is_loaded(got)
    return None in got or set(getattr(owner, "shard_names", [None])) <= got


def _target(name: str, mapping: dict, experts: dict) -> tuple[str, int | str | tuple | None]:
    """(our parameter name, shard id) of one checkpoint tensor."""
    m = EXPERT_NAME.search(name) if experts else None
    if m is not None and m.group(2) in experts:
        dst, part = experts[m.group(2)]
        return f"{name[: m.start()]}.experts.{dst}.{name[m.end() :]}", (int(m.group(1)), part)
    for src, (dst, shard_id) in mapping.items():
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), shard_id
    return name, None


def _names(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(
    model: nn.Module, stream: Iterable[tuple[str, torch.Tensor]], *, progress: bool = False
) -> None:
    """Copy every (hf_name, tensor) of `stream` into `model`.

    Args:
        model: a model with `packed_modules_mapping` and per-parameter `weight_loader`s.
        stream: (Hugging Face name, tensor) pairs from hf_weights or gguf_weights.
        progress: show a tqdm bar while loading.
    Raises:
        WeightLoadError: naming tensors the model has no place for, or parameters never loaded.
    """
    adapt = getattr(model, "adapt_weights", None)  # Phi-3's fused qkv, Gemma 3's vision tower
    if adapt is not None:
        stream = adapt(stream)
    params = dict(model.named_parameters())
    mapping: dict[str, tuple[str, int | str]] = getattr(model, "packed_modules_mapping", {})
    experts: dict[str, tuple[str, int]] = getattr(model, "expert_params_mapping", {})
    tied = getattr(model, "lm_head", "absent") is None
    loaded: dict[str, set] = {name: set() for name in params}
    unexpected: list[str] = []
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc="Loading weights", unit="tensor", leave=False)
    for name, tensor in stream:
        if name.endswith(IGNORED_SUFFIXES) or (tied and name.startswith("lm_head.")):
            continue
        target, shard = _target(name, mapping, experts)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", _default_loader)
        try:
            loader(param, tensor, shard)
        except ValueError as e:
            raise WeightLoadError(f"cannot load {name} into {target}: {e}") from e
        loaded[target].add(shard)
    missing = [name for name, got in loaded.items() if not _complete(params[name], got)]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors: {_names(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} parameters not in the checkpoint: {_names(missing)}")
        raise WeightLoadError("; ".join(parts))
    # NOTE: glibc keeps freed heap pages: give the conversion's garbage back to the OS, so the
    # resident set after loading is the weights
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
    logger.info("loaded %d parameters", len(params))
