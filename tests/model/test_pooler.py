"""model/pooler.py: pooling config from sentence-transformers files (v6 and older) and
--pooler-config, base-model names, and the chunked pooling arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.pooler import (
    PoolerConfig,
    add_chunk,
    as_base_model_config,
    finish,
    load_pooler_config,
    pool_chunk,
    with_model_prefix,
)

pytestmark = pytest.mark.timeout(30)


def st_folder(tmp_path: Path, pooling: dict, normalize: bool, old: bool = False) -> str:
    ns = "sentence_transformers.models." if old else "sentence_transformers.base.modules."
    modules = [{"idx": 0, "name": "0", "path": "", "type": ns + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ns + "Pooling"}]  # fmt: skip
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ns + "Normalize"})
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return str(tmp_path)


def test_sentence_transformers_files_v6_and_older(tmp_path: Path) -> None:
    v6 = st_folder(tmp_path / "a", {"pooling_mode": "mean"}, normalize=True)
    assert load_pooler_config(v6) == PoolerConfig("MEAN", True)
    flags = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    old = st_folder(tmp_path / "b", flags, normalize=False, old=True)
    assert load_pooler_config(old) == PoolerConfig("CLS", False)
    override = {"pooling_type": "last", "normalize": True}
    assert load_pooler_config(old, override) == PoolerConfig("LAST", True)
    assert load_pooler_config(str(tmp_path / "none.gguf")) == PoolerConfig("LAST", True)


@pytest.mark.parametrize(
    ("pooling", "override", "message"),
    [
        ({"pooling_mode": "max"}, None, "pools by ['max']"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None, "pools by"),
        ({"pooling_mode": "mean"}, {"pooling_type": "SUM"}, "pooling_type must be one of"),
        ({"pooling_mode": "mean"}, {"dimensions": 3}, "unknown keys ['dimensions']"),
        ({"pooling_mode": "mean"}, {"normalize": "yes"}, "normalize must be true or false"),
    ],
)
def test_bad_pooling_configs_say_why(tmp_path: Path, pooling, override, message) -> None:
    with pytest.raises(ValueError) as info:
        load_pooler_config(st_folder(tmp_path / "m", pooling, True), override)
    assert message in str(info.value)


def test_base_model_layout_maps_to_the_causal_lm() -> None:
    cfg = as_base_model_config({"architectures": ["Qwen2Model"], "hidden_size": 8})
    assert cfg == {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8}
    assert as_base_model_config({"architectures": ["LlamaForCausalLM"]})["architectures"] == [
        "LlamaForCausalLM"
    ]
    names = [
        n for n, _ in with_model_prefix([("layers.0.x", 1), ("model.norm", 2), ("lm_head.w", 3)])
    ]
    assert names == ["model.layers.0.x", "model.norm", "lm_head.w"]


def test_chunks_fold_into_last_cls_and_mean() -> None:
    h = torch.arange(12, dtype=torch.float32).view(4, 3)  # 4 tokens in two chunks of 2
    chunks = [(h[:2], True, False), (h[2:], False, True)]
    want = {"LAST": [9.0, 10.0, 11.0], "CLS": [0.0, 1.0, 2.0], "MEAN": [4.5, 5.5, 6.5]}
    for kind, value in want.items():
        acc = None
        for chunk, first, last in chunks:
            acc = add_chunk(acc, pool_chunk(chunk, kind, first, last), kind)
        assert finish(acc, 4, PoolerConfig(kind, normalize=False)) == value
    normed = finish([3.0, 4.0], 1, PoolerConfig("LAST", normalize=True))
    assert normed == pytest.approx([0.6, 0.8], abs=1e-7)
