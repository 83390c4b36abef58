"""ModelRunner: StepInput -> tensors -> one batched forward -> sampling-row logits -> sampler."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from model.config import ModelConfig
from model.inputs import StepInput, StepOutput
from model.kv_cache import KVCacheSpec, allocate_kv_cache, default_kv_cache_memory
from model.layers.attention import AttentionMetadata
from model.llama import LlamaForCausalLM
from model.loader import load_weights
from model.parallel import ParallelContext

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return DTYPES[dtype]


def open_checkpoint(path: str):
    """(config dict, weight stream) for an HF folder or a .gguf file."""
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        from model.gguf_weights import load_gguf

        ckpt = load_gguf(path)
        return ckpt.config, ckpt.tensors()
    from model.hf_weights import iterate_hf_weights, load_hf_config, safetensors_files

    config = load_hf_config(path)
    safetensors_files(path)  # fail early, before the model is built
    return config, iterate_hf_weights(path)


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Allocate a meta-built model on `device` in `dtype`, then re-attach the weight loaders."""
    model = model.to(dtype=dtype).to_empty(device=device)
    for module in model.modules():
        loader = getattr(module, "weight_loader", None)
        if loader is not None:
            for param in module.parameters(recurse=False):
                param.weight_loader = loader
    return model


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler for one tensor-parallel rank."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        tensor_parallel_size: int = 1,
        seed: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel_size} is not supported yet (only 1)"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.seed = seed
        self.parallel = ParallelContext()

        config, stream = open_checkpoint(model)
        self.model_config = cfg = ModelConfig.from_hf_dict(config)
        with torch.device("meta"):
            net = LlamaForCausalLM(cfg, self.parallel)
        self.model = materialize(net, self.device, self.dtype).eval()
        load_weights(self.model, stream, progress=True)

        attn = self.model.attention_layers()[0]
        spec = KVCacheSpec(
            cfg.num_hidden_layers, attn.num_kv_heads, cfg.head_dim, block_size, self.dtype
        )
        memory = (
            kv_cache_memory if kv_cache_memory is not None else default_kv_cache_memory(self.device)
        )
        self.num_kv_blocks = spec.num_blocks(memory)
        capacity = spec.capacity_tokens(self.num_kv_blocks)
        if self.num_kv_blocks < 1:
            raise ValueError(
                f"kv_cache_memory {memory} bytes holds no block; one block of {block_size} tokens "
                f"needs {spec.bytes_per_block} bytes"
            )
        if max_model_len is not None and max_model_len > capacity:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the KV cache capacity of {capacity} tokens "
                f"({self.num_kv_blocks} blocks of {block_size}); raise kv_cache_memory or lower "
                "max_model_len"
            )
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, capacity)
        self.kv_cache = allocate_kv_cache(spec, self.num_kv_blocks, self.device)
        for layer, (k, v) in zip(self.model.attention_layers(), self.kv_cache, strict=True):
            layer.bind_kv_cache(k, v)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); max_model_len %d",
            self.num_kv_blocks,
            block_size,
            capacity,
            self.num_kv_blocks * spec.bytes_per_block / 1024**3,
            str(self.dtype).removeprefix("torch."),
            self.max_model_len,
        )
        self._sampler = None

    def _check(self, step: StepInput) -> None:
        n = step.num_tokens
        if len(step.positions) != n or len(step.slot_mapping) != n or sum(step.query_lens) != n:
            raise ValueError(
                f"step has {n} input_ids, {len(step.positions)} positions, "
                f"{len(step.slot_mapping)} slots and query_lens summing to {sum(step.query_lens)}"
            )
        if not len(step.context_lens) == len(step.block_tables) == step.num_seqs:
            raise ValueError(
                f"step has {step.num_seqs} query_lens, {len(step.context_lens)} context_lens and "
                f"{len(step.block_tables)} block_tables"
            )

    @torch.inference_mode()
    def compute_logits(self, step: StepInput) -> torch.Tensor:
        """Run the batched forward (writing K/V) -> [len(sample_indices), vocab] float32 logits."""
        self._check(step)
        dev = self.device
        meta = AttentionMetadata.build(
            step.query_lens,
            step.context_lens,
            step.block_tables,
            step.slot_mapping,
            self.block_size,
            dev,
        )
        input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=dev)  # [T]
        positions = torch.tensor(step.positions, dtype=torch.long, device=dev)  # [T]
        hidden = self.model(input_ids, positions, meta)  # [T, hidden]
        ends, end = [], 0
        for q in step.query_lens:
            end += q
            ends.append(end - 1)
        rows = [ends[i] for i in step.sample_indices]
        if rows != list(range(step.num_tokens)):
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=dev)]
        return self.model.compute_logits(hidden)  # [num_sample_rows, vocab]

    def execute(self, step: StepInput) -> StepOutput:
        """One step for every scheduled token.

        Args:
            step: token ids, positions, slots, block tables, and which sequences sample.
        Returns:
            StepOutput with one sampled token (and optional logprobs) per entry of sample_indices.
        """
        if len(step.sampling) != len(step.sample_indices):
            raise ValueError(
                f"step has {len(step.sample_indices)} sample_indices but "
                f"{len(step.sampling)} sampling rows"
            )
        logits = self.compute_logits(step)
        if not step.sample_indices:
            return StepOutput(token_ids=[], logprobs=[])
        if self._sampler is None:
            from model.sampler import Sampler

            self._sampler = Sampler(self.seed)
        return self._sampler(logits, step.sampling)

    def shutdown(self) -> None:
        """Stops TP workers; nothing to do at tensor_parallel_size 1."""
        self._sampler = None
