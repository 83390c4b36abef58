"""ModelRunner and its loaders reject bad input with errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.inputs import SamplingRow, StepInput
from model.loader import WeightLoadError
from model.runner import ModelRunner


def copy_checkpoint(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.timeout(30)
def test_missing_folder_and_files_name_the_path(tmp_path: Path, tiny_checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        ModelRunner(str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        ModelRunner(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json"):
        ModelRunner(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_checkpoint("llama") / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no .*safetensors.*no_weights"):
        ModelRunner(str(no_weights))


@pytest.mark.timeout(30)
def test_unknown_architecture_is_named(tmp_path: Path, tiny_checkpoint) -> None:
    folder = copy_checkpoint(
        tiny_checkpoint("llama"), tmp_path / "m", architectures=["GPT2LMHeadModel"]
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        ModelRunner(str(folder))


@pytest.mark.timeout(30)
def test_max_model_len_beyond_kv_capacity(tiny_checkpoint) -> None:
    folder = str(tiny_checkpoint("llama"))
    # tiny model: 2 layers x 2 KV heads x 16 dims x 4 bytes x 2 (K, V) x 16 tokens = 8 KiB a block
    with pytest.raises(ValueError, match="max_model_len 512 .* 128 tokens"):
        ModelRunner(folder, kv_cache_memory=8 * 8192, max_model_len=512)
    runner = ModelRunner(folder, kv_cache_memory=8 * 8192)
    assert (runner.num_kv_blocks, runner.block_size, runner.max_model_len) == (8, 16, 128)
    with pytest.raises(ValueError, match="holds no block"):
        ModelRunner(folder, kv_cache_memory=100)


@pytest.mark.timeout(30)
def test_missing_and_unexpected_tensors_are_named(tmp_path: Path, tiny_checkpoint) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.extra\.weight") as e:
        ModelRunner(str(folder))
    assert "model.layers.1.self_attn.qkv_proj.weight" in str(e.value)


@pytest.mark.timeout(30)
def test_config_reads_old_and_transformers5_rope_keys() -> None:
    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    rope = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    old = ModelConfig.from_hf_dict(dict(base, rope_theta=5e5, rope_scaling=rope))
    new = ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(rope, rope_theta=5e5)))
    assert old == new and old.rope_theta == 5e5 and old.rope_scaling_dict["factor"] == 8.0
    assert old.head_dim == 4 and not old.attention_bias
    plain = ModelConfig.from_hf_dict(
        dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    )
    assert plain.rope_scaling is None and plain.rope_theta == 1e4
    qwen = ModelConfig.from_hf_dict(dict(base, architectures=["Qwen2ForCausalLM"]))
    assert qwen.attention_bias
    mistral = dict(base, architectures=["MistralForCausalLM"], max_position_embeddings=64)
    windowed = ModelConfig.from_hf_dict(dict(mistral, sliding_window=16))
    assert windowed.sliding_window == 16 and windowed.all_layers_sliding
    assert windowed.layer_types == ("sliding_attention",) * base["num_hidden_layers"]
    moot = ModelConfig.from_hf_dict(dict(mistral, sliding_window=64))  # never leaves the window
    assert moot.sliding_window is None and not moot.all_layers_sliding
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'su'"):
        ModelConfig.from_hf_dict(dict(base, rope_scaling={"type": "su", "factor": 2.0}))


@pytest.mark.timeout(30)
def test_execute_greedy_is_argmax_and_bad_steps_raise(tiny_checkpoint) -> None:
    pytest.importorskip("model.sampler")
    runner = ModelRunner(str(tiny_checkpoint("qwen2", True)), kv_cache_memory=1 << 20)
    ids = list(range(100, 120))
    step = StepInput(ids, list(range(20)), list(range(20)), [20], [20], [[0, 1]], [0])
    logits = runner.compute_logits(step)
    step.sampling = [SamplingRow()]
    out = runner.execute(step)
    assert out.token_ids == [int(logits[0].argmax())]
    bad = StepInput(ids, list(range(19)), list(range(20)), [20], [20], [[0, 1]], [0])
    with pytest.raises(ValueError, match="20 input_ids, 19 positions"):
        runner.compute_logits(bad)
    step.sampling = []
    with pytest.raises(ValueError, match="1 sample_indices but 0 sampling rows"):
        runner.execute(step)
    runner.shutdown()


def _resident_kib(t: torch.Tensor) -> int:
    """Rss of the mapping holding t's storage, from /proc/self/smaps."""
    addr, found = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not line.startswith(("Rss", "Size")):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= addr < hi
            elif found and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds address {addr:#x}")


@pytest.mark.timeout(60)
def test_cpu_kv_cache_pages_follow_the_blocks_written() -> None:
    """A (head, block) of 4 KiB is one page: writing n blocks makes n pages per head resident."""
    from model.kv_cache import KVCacheSpec, allocate_kv_cache

    spec = KVCacheSpec(
        num_layers=1, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    ((k, v),) = allocate_kv_cache(spec, 512, torch.device("cpu"))
    assert k.shape == (2, 512, 16, 64) and k.data_ptr() % 4096 == 0 and bool((k == 0).all())
    before = _resident_kib(k)
    k[:, 100:110] = 1.0  # 10 blocks x 2 heads
    assert _resident_kib(k) - before == 10 * 2 * 4
    assert v.data_ptr() % 4096 == 0 and float(v.sum()) == 0.0
