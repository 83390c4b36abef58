"""ModelRunner: StepInput -> tensors -> one batched forward -> sampling-row logits -> sampler."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.config import ModelConfig, check_engine_args
from model.cuda_graphs import CUDAGraphs
from model.inputs import StepInput, StepOutput, TokenLogprob
from model.kv_cache import KVCacheSpec, allocate_kv_cache, default_kv_cache_memory
from model.layers import kernels
from model.layers.attention import AttentionMetadata
from model.layers.fused_decode import FusedDecode
from model.layers.linear import packed_nbytes
from model.layers.qdot import rtn_to_blocks
from model.layers.quant import quantize_rtn
from model.loader import load_weights
from model.models import MODELS
from model.parallel import ParallelContext, all_reduce
from model.pooler import as_base_model_config, pool_chunk, with_model_prefix

if TYPE_CHECKING:
    from model.constraints import ConstraintBatch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNNERS = ("generate", "pooling")  # vLLM's --runner
# prompt positions projected to the vocabulary at once: bounds prompt logprobs' logits memory
PROMPT_LOGPROB_ROWS = 256


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """auto: cuda if available, else cpu; on CUDA each rank of a host takes its own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and local_rank else dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def resolve_activation_dtype(
    activation_dtype: str, packed: bool, path: str, device: torch.device, dtype
) -> str:
    """auto: int8 where it can serve, else float32. int8 needs packed weights (`packed`: a
    quantized GGUF's blocks, or --quantization int8 / int4 as Q8_0 / Q4_1 blocks) on CPU in
    float32 with the C kernels; float32 stays the exact path (within 1e-3 of transformers). Both
    are bitwise batch-invariant where decode.c serves (benchmarks/batch_invariance.py)."""
    int8 = packed and device.type == "cpu" and dtype == torch.float32 and kernels.load() is not None
    if activation_dtype == "int8" and not int8:
        raise ValueError(
            "activation_dtype int8 needs packed weights (a quantized GGUF, or --quantization int8 "
            "or int4), served on CPU in float32 with the C kernels (got "
            f"{path}, packed {packed}, device "
            f"{device}, dtype {dtype}, kernels {'on' if kernels.load() else 'off'})"
        )
    if activation_dtype == "auto":
        return "int8" if int8 else "float32"
    return activation_dtype


def open_checkpoint(path: str, quantization: str | None = None):
    """(config dict, packed, tensors) for an HF folder or a .gguf file, opened once: `packed`
    says whether the weights load packed (a quantized GGUF, or --quantization int8 / int4) and
    tensors(blocks) streams them.

    quantization None keeps a GGUF's quantized tensors packed and an HF checkpoint float;
    "none" dequantizes everything to float (the reference path); "int8"/"int4" also pack the
    float 2-D weights, MoE routers excepted (round to nearest, group 32). blocks: a GGUF's
    quantized tensors stay in the file's own blocks (the int8 path, model/layers/qdot.py).
    """
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        from model.gguf_weights import load_gguf

        ckpt = load_gguf(path)
        config, packed = ckpt.config, quantization is None and ckpt.has_blocks()

        def stream(blocks: bool):
            return ckpt.tensors(packed=quantization != "none", blocks=blocks)
    else:
        from model.hf_weights import iterate_hf_weights, load_hf_config, safetensors_files

        config, packed = load_hf_config(path), False
        safetensors_files(path)  # fail early, before the model is built

        def stream(blocks: bool):
            return iterate_hf_weights(path)

    if quantization not in ("int8", "int4"):
        return config, packed, stream
    bits = 8 if quantization == "int8" else 4
    return config, True, lambda blocks: _quantize_stream(stream(blocks), bits, blocks)


# MoE routers (Mixtral's named before adapt_weights renames block_sparse_moe) and Qwen2-MoE's
# shared-expert gate stay float, as llama.cpp keeps them: a rounded router can pick other experts.
ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".shared_expert_gate.weight")


def _quantize_stream(stream, bits: int, blocks: bool):
    """Pack every float 2-D weight whose rows split into whole groups (as Q8_0 / Q4_1 blocks for
    the int8 path) but the routers; the rest pass through."""
    for name, tensor in stream:
        matrix = isinstance(tensor, torch.Tensor) and tensor.dim() == 2
        if matrix and tensor.shape[1] % 32 == 0 and not name.endswith(ROUTERS):
            tensor = quantize_rtn(tensor, bits)
            tensor = rtn_to_blocks(tensor) if blocks else tensor
        yield name, tensor


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
    """One tensor-parallel rank: its model shard, its paged KV cache and (rank 0) the sampler.

    Which ranks exist and how steps reach them is the executor's business (model/executor.py).
    kv_cache_memory is per rank (as vLLM's per-GPU budget); the CPU default is split among the
    ranks sharing this host's RAM (`parallel.local_size`).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        parallel: ParallelContext | None = None,
        local_rank: int = 0,
        enforce_eager: bool = False,
        activation_dtype: str = "auto",
        runner: str = "generate",
        fused_step: bool | None = None,
    ) -> None:
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
        check_engine_args(
            block_size=block_size,
            tensor_parallel_size=parallel.size if parallel is not None else 1,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
            activation_dtype=activation_dtype,
        )
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seed = seed
        self.last_timings: dict[str, float] = {}
        self.last_path = ""  # what served the last step: choose_path() + activation dtype
        self._sampler = None
        self.runner = runner
        self._extras: tuple[list[list[TokenLogprob]], list[list[float]]] = ([], [])
        self.fused: FusedDecode | None = None
        self.graphs: CUDAGraphs | None = None
        self.enforce_eager = enforce_eager
        # False: the torch modules serve every step (None: TOKENMILL_FUSED_DECODE=0 says False)
        env = os.environ.get("TOKENMILL_FUSED_DECODE", "1") != "0"
        self.fused_step = env if fused_step is None else fused_step
        self.parallel = parallel or ParallelContext()
        self.device = resolve_device(device, local_rank)
        self.dtype = resolve_dtype(dtype, self.device)
        config, packed, tensors = open_checkpoint(model, quantization)
        self.activation_dtype = resolve_activation_dtype(
            activation_dtype, packed, model, self.device, self.dtype
        )
        stream = tensors(self.activation_dtype == "int8")
        if runner == "pooling":  # NOTE: a sentence-transformers folder holds the base model
            config, stream = as_base_model_config(config), with_model_prefix(stream)
        self.model_config = ModelConfig.from_hf_dict(config)
        self._build(stream, kv_cache_memory, max_model_len, kv_cache_dtype)

    def _build(
        self,
        stream,
        kv_cache_memory: int | None,
        max_model_len: int | None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """Build this rank's shard, load its weights, size (same on all ranks) and bind the KV."""
        cfg, ctx, block_size = self.model_config, self.parallel, self.block_size
        with torch.device("meta"):
            net = MODELS[cfg.architecture](cfg, ctx)
        if self.runner == "pooling":
            net.lm_head = None  # no head to load: pooling reads hidden states
        self.model = materialize(net, self.device, self.dtype).eval()
        if self.device.type == "cpu" and self.dtype == torch.float32:
            kernels.load()  # the CPU kernels, compiled once per machine (optional)
        load_weights(self.model, stream, progress=ctx.is_first)
        self.weight_bytes = packed_nbytes(self.model) + sum(
            p.numel() * p.element_size() for p in self.model.parameters()
        )
        self._log_weights()

        spec, capacity, use_graphs = self._size_kv_cache(
            kv_cache_memory, max_model_len, kv_cache_dtype
        )
        self.kv_cache = allocate_kv_cache(spec, self.num_kv_blocks + use_graphs, self.device)
        for layer, (k, v) in zip(self.model.attention_layers(), self.kv_cache, strict=True):
            layer.bind_kv_cache(k, v)
        self.fused = None  # None: torch serves every step
        if self.fused_step and self.model.fits_fused_decode:  # decode.c knows the Llama layer
            self.fused = FusedDecode.build(self.model, block_size)
        if use_graphs:
            self.graphs = CUDAGraphs(self.model, block_size, self.max_model_len, self.num_kv_blocks)
        if self.device.type == "cuda":
            # NOTE: cuDNN's SDPA plans each new shape (every eager step): measured on an H200, off
            # it takes one eager decode stream from 42 to 17 ms a step, a graph's from 3.7 to 3.3
            torch.backends.cuda.enable_cudnn_sdp(False)
        if ctx.is_first:
            self._log_kv_cache(spec, capacity)

    def _log_weights(self) -> None:
        """What this rank holds and which activations serve it (the int8 path names its ISA)."""
        logger.info(
            "rank %d holds %.1f MiB of weights (%.1f MiB packed); %s activations%s",
            self.parallel.rank,
            self.weight_bytes / 2**20,
            packed_nbytes(self.model) / 2**20,
            self.activation_dtype,
            f" ({kernels.int8_isa(kernels.load())} on {kernels.cpu_name()})"
            if self.activation_dtype == "int8"
            else "",
        )

    def _size_kv_cache(
        self, kv_cache_memory: int | None, max_model_len: int | None, kv_cache_dtype: str
    ) -> tuple[KVCacheSpec, int, bool]:
        """(spec, capacity in tokens, CUDA graphs on): the block count is the smallest any rank
        affords, so every rank's block ids mean the same; sets kv_cache_dtype, num_kv_blocks and
        max_model_len."""
        cfg, ctx, block_size = self.model_config, self.parallel, self.block_size
        attn = self.model.attention_layers()[0]
        self.kv_cache_dtype = self.dtype if kv_cache_dtype == "auto" else DTYPES[kv_cache_dtype]
        # NOTE: float16 K/V with int8 activations (llama.cpp's default) measured 0.34 from
        # transformers on the parity prompts (float32 K/V: 0.24): opt-in, not auto
        spec = KVCacheSpec(
            cfg.num_hidden_layers, attn.num_kv_heads, cfg.head_dim, block_size, self.kv_cache_dtype
        )
        memory = kv_cache_memory
        if memory is None:
            memory = default_kv_cache_memory(self.device, spec, max_model_len)
            memory //= ctx.local_size if self.device.type == "cpu" else 1
        blocks = torch.tensor([spec.num_blocks(memory)], dtype=torch.long, device=self.device)
        self.num_kv_blocks = int(all_reduce(blocks, ctx, op="min").item())  # the same on all
        # CUDA graphs (one rank, not --enforce-eager) reserve the last block for padded rows
        use_graphs = self.device.type == "cuda" and not self.enforce_eager and ctx.size == 1
        self.num_kv_blocks -= int(use_graphs)
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
        return spec, capacity, use_graphs

    def _log_kv_cache(self, spec: KVCacheSpec, capacity: int) -> None:
        """The KV cache's blocks, tokens, bytes per rank and the max_model_len they allow."""
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB per rank, %s); max_model_len %d",
            self.num_kv_blocks,
            self.block_size,
            capacity,
            self.num_kv_blocks * spec.bytes_per_block / 1024**3,
            str(self.kv_cache_dtype).removeprefix("torch."),
            self.max_model_len,
        )

    def check_step(self, step: StepInput) -> None:
        """Raise ValueError on a malformed step (before any rank starts on it)."""
        if self.parallel.is_first and len(step.sampling) != step.num_sample_rows:
            raise ValueError(
                f"step has {len(step.sample_indices)} sample_indices but {len(step.sampling)} "
                f"sampling rows ({step.num_sample_rows} wanted)"
            )
        self._check(step)

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
        # NOTE: decode.c writes K/V at these slots: an id out of range is refused here, not
        # turned into a heap write
        blocks = self.num_kv_blocks
        ids = [b for t in step.block_tables for b in t]
        if (ids and not 0 <= min(ids) <= max(ids) < blocks) or (
            step.slot_mapping
            and not 0 <= min(step.slot_mapping) <= max(step.slot_mapping) < blocks * self.block_size
        ):
            raise ValueError(
                f"step names a block or slot out of range: blocks {min(ids, default=0)}.."
                f"{max(ids, default=0)}, slots {min(step.slot_mapping, default=0)}.."
                f"{max(step.slot_mapping, default=0)}, for {blocks} blocks of {self.block_size}"
            )

    def compute_logits(self, step: StepInput) -> torch.Tensor:
        """Run the batched forward (writing K/V) -> [num_sample_rows, vocab] float32 logits.

        Under tensor parallelism every rank runs it on the same step (the executor sends it) and
        joins the collectives; only rank 0's logits are non-empty.
        """
        self._check(step)
        return self.forward_step(step)

    def choose_path(self, step: StepInput) -> str:
        """The one place that decides what serves a step: "graph" (a CUDA graph replay), "fused"
        (decode.c: every layer of a decode step in one call) or "torch" (the modules, the
        reference); the linears inside follow the runner's activation dtype."""
        if self.graphs is not None and self.graphs.shape(step) is not None:
            return "graph"
        if self.fused is not None and FusedDecode.takes(step.query_lens):
            return "fused"
        return "torch"

    @torch.inference_mode()
    def forward_step(self, step: StepInput) -> torch.Tensor:
        """This rank's part of one step; a worker's logits are empty (only rank 0 gathers them)."""
        t0 = time.perf_counter()
        self.parallel.timer.reset()
        dev = self.device
        rows = step.sample_rows()  # NOTE: a speculating sequence samples 1 + its drafts
        path = self.choose_path(step)
        self.last_path = f"{path}_{self.activation_dtype}" if path != "graph" else path
        t1 = time.perf_counter()
        if path == "graph":  # NOTE: a graph copies the step into its own static buffers
            hidden = self.graphs.run(step)  # [T, hidden]
        else:
            input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=dev)  # [T]
            positions = torch.tensor(step.positions, dtype=torch.long, device=dev)  # [T]
            if path == "fused":
                t1 = time.perf_counter()
                hidden = self.fused(  # [T, hidden]: every layer in one decode.c call
                    input_ids,
                    positions,
                    step.slot_mapping,
                    step.query_lens,
                    step.context_lens,
                    step.block_tables,
                )
            else:
                meta = AttentionMetadata.build(
                    step.query_lens,
                    step.context_lens,
                    step.block_tables,
                    step.slot_mapping,
                    self.block_size,
                    dev,
                )
                t1 = time.perf_counter()
                hidden = self.model(input_ids, positions, meta)  # [T, hidden]
        self._extras = self._prompt_logprobs(step, hidden), self._pool(step, hidden)  # [T] rows
        if rows != list(range(step.num_tokens)):
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=dev)]
        logits = self.model.compute_logits(hidden)  # [num_sample_rows, vocab] (rank 0)
        timings = {"prepare": t1 - t0, "forward": time.perf_counter() - t1}
        if self.parallel.size > 1:  # NOTE: part of forward, not added to it
            timings["comm"] = self.parallel.timer.seconds
        self.last_timings = timings
        return logits

    def execute(self, step: StepInput, constraints: ConstraintBatch | None = None) -> StepOutput:
        """One step for every scheduled token on this rank.

        Args:
            step: token ids, positions, slots, block tables, and which sequences sample.
            constraints: grammar masks for some sampling rows (rank 0 only; filled while the
                forward runs), or None.
        Returns:
            StepOutput with one sampled token (and optional logprobs) per sampling row
            on rank 0; an empty one on the other ranks (they hold no logits and do not sample).
        """
        self.check_step(step)
        return self.sample(self.forward_step(step), step, constraints)

    def sample(
        self, logits: torch.Tensor, step: StepInput, constraints: ConstraintBatch | None = None
    ) -> StepOutput:
        """Rank 0: the step's sampling rows from its logits; other ranks return an empty output."""
        t0 = time.perf_counter()
        if not step.sample_indices or not self.parallel.is_first:
            out = StepOutput(token_ids=[], logprobs=[])
        else:
            if self._sampler is None:
                from model.sampler import Sampler

                self._sampler = Sampler(self.seed)
            out = self._sampler(logits, step.sampling, constraints)
        out.prompt_logprobs, out.pooled = self._extras
        self._extras = ([], [])
        self.last_timings["sample"] = time.perf_counter() - t0
        return out

    @staticmethod
    def _chunk_starts(step: StepInput) -> list[int]:
        starts, start = [], 0
        for q in step.query_lens:
            starts.append(start)
            start += q
        return starts

    def _prompt_logprobs(self, step: StepInput, hidden: torch.Tensor) -> list[list[TokenLogprob]]:
        """Logprobs of the prompt rows' next tokens (rank 0; every rank joins the head's gather),
        projected PROMPT_LOGPROB_ROWS positions at a time."""
        if not step.prompt_logprobs:
            return []
        from model.sampler import prompt_logprobs

        starts, out = self._chunk_starts(step), []
        for row in step.prompt_logprobs:
            first = starts[row.seq_index] + row.offset
            entries: list[TokenLogprob] = []
            for i in range(0, len(row.target_ids), PROMPT_LOGPROB_ROWS):
                targets = row.target_ids[i : i + PROMPT_LOGPROB_ROWS]
                h = hidden[first + i : first + i + len(targets)]  # [rows, hidden]
                logits = self.model.compute_logits(h)  # [rows, vocab] (rank 0)
                if self.parallel.is_first:
                    entries += prompt_logprobs(logits, targets, row.num_logprobs)
            out.append(entries)
        return out

    def _pool(self, step: StepInput, hidden: torch.Tensor) -> list[list[float]]:
        """Each pooling row's share of its embedding from this chunk (rank 0 only)."""
        if not step.pooling or not self.parallel.is_first:
            return []
        starts = self._chunk_starts(step)
        return [
            pool_chunk(
                hidden[starts[r.seq_index] : starts[r.seq_index] + step.query_lens[r.seq_index]],
                r.pooling_type,
                r.is_first,
                r.is_last,
            )
            for r in step.pooling
        ]

    def shutdown(self) -> None:
        """Drop the sampler; the executor owns processes and groups (nothing else to stop)."""
        self._sampler = None
