"""Hugging Face folder adapter: config.json and (sharded) *.safetensors -> (hf_name, tensor)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch


def load_hf_config(folder: str) -> dict:
    """The config.json dict of a checkpoint folder; FileNotFoundError names what is missing."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.json not found in model folder: {path}")
    with open(path) as f:
        return json.load(f)


def safetensors_files(folder: str) -> list[str]:
    """Shards listed by model.safetensors.index.json, else every *.safetensors in the folder."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, n) for n in names]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard listed in {index} not found: {path}")
        return files
    files = sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors")
    )
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights found in model folder: {folder}")
    return files


def iterate_hf_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of every shard, lazily (one tensor in memory at a time)."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
