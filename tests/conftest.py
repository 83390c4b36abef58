"""Shared fixtures: tiny random checkpoints the SmolLM2 GGUF, its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scheduler.config import default_model_path

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,  # long enough for e2e streams that must outlast a test step
    initializer_range=0.1,  # peaky logits: greedy parity never rides on a float32 near-tie
)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, request) -> Path:
    """SmolLM2's real tokenizer (vocab, merges, chat template) saved as HF tokenizer files, or
    the folder $TOKENMILL_TEST_TOKENIZER names (a GPU host without the GGUF package).

    NOTE: through tokenmill's loader (transformers' GGUF conversion, cached on disk): the servers
    the tests start then find the conversion done."""
    from model.tokenizer import load_tokenizer

    if os.environ.get("TOKENMILL_TEST_TOKENIZER"):
        return Path(os.environ["TOKENMILL_TEST_TOKENIZER"])
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    load_tokenizer(request.getfixturevalue("smollm2_gguf")).hf.save_pretrained(out)
    return out


def build_tiny_checkpoint(
    out: Path, tokenizer_dir: Path, arch: str = "llama", tie: bool = False, seed: int = 0
) -> Path:
    """Save a random 2-layer transformers checkpoint (config, safetensors, tokenizer) to `out`."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        TINY_DIMS, vocab_size=49152, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    elif arch == "llama3":
        rope = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
            rope_theta=500000.0,
        )
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=rope))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0))
    else:
        raise ValueError(arch)
    model = model.float().eval()
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path):
    """Factory: tiny_checkpoint(arch="llama"|"llama3"|"qwen2", tie=False) -> folder, built once."""
    cache: dict[tuple[str, bool], Path] = {}

    def make(arch: str = "llama", tie: bool = False) -> Path:
        key = (arch, tie)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{arch}_{'tied' if tie else 'untied'}")
            cache[key] = build_tiny_checkpoint(out, smollm2_tokenizer_dir, arch, tie)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_hf_reference(smollm2_gguf: str):
    """transformers' float32 model of the SmolLM2 GGUF: the parity oracle, loaded once (~30 s).

    NOTE: transformers' own conversion of the GGUF, kept as safetensors in tokenmill's disk cache
    (keyed by the file and the transformers version): later sessions load it in ~3 s."""
    import shutil
    import tempfile

    import safetensors.torch
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.disk_cache import cache_dir

    root, st = cache_dir("hf-reference"), os.stat(smollm2_gguf)
    key = f"{Path(smollm2_gguf).stem}-{st.st_size}-{st.st_mtime_ns}-{transformers.__version__}"
    cached = None if root is None else root / key
    if cached is not None and (cached / "model.safetensors").is_file():
        config = AutoConfig.from_pretrained(cached)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        safetensors.torch.load_model(model, cached / "model.safetensors")
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    )
    if cached is not None:
        tmp = None
        try:  # written aside, then renamed: a concurrent session never reads half a folder
            root.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
            model.config.save_pretrained(tmp)  # (save_pretrained refuses a GGUF-loaded model)
            safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
            os.rename(tmp, cached)
        except OSError:  # a read-only or full cache costs the next session the conversion only
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return model.eval()


def build_hf_cache(
    hf_home: Path, repo_id: str, source: Path, commit: str = "a" * 40, ref: str | None = "main"
) -> Path:
    """Lay `source`'s files out as huggingface_hub caches a download, under $HF_HOME/hub:
    models--org--name/snapshots/<commit>/... (links) and refs/<ref> holding the commit."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in Path(source).iterdir():
        if not (snapshot / f.name).exists():
            (snapshot / f.name).symlink_to(f.resolve())
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
