"""Steps through decode.c: every decoder layer of a dense model in one C call.

Serves every step (decode rows, prompt chunks, mixed) at tensor_parallel_size 1, on CPU in
float32 with packed weights and a float32 or float16 KV cache: each row's arithmetic depends on
that row alone, which is what makes a request's output bitwise batch-invariant. The layer is
Llama's with the dense families' variations as data (Gemma's sandwich and (1 + w) norms,
GELU-tanh, soft-cap and local RoPE, sliding windows, NoPE layers, partial rotary, Granite's
multipliers). Sparse MoE layers (Qwen3-MoE, Mixtral, Qwen2-MoE) pass their router and
per-expert pointer tables (dmoe). TP, float checkpoints and OLMoE run the torch modules, which
are the reference (tests/model/test_fused_decode.py, test_fused_moe.py and
test_families_parity.py compare both).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from model.layers import kernels
from model.layers.qdot import GGML_TYPE_IDS, BlockTensor
from model.layers.quant import QuantTensor

_p, _i, _l, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


MAX_PARTS = 3  # decode.c's parts of one merged GGUF-block linear (q, k, v)
KV_DTYPES = (torch.float32, torch.float16)  # the KV caches decode.c reads and writes


class _Lin(ctypes.Structure):
    _fields_ = [
        ("q", _p),
        ("scales", _p),
        ("mins", _p),
        ("bias", _p),
        ("bits", _i),
        ("group", _i),
        ("f32", _i),
        ("n_in", _l),
        ("n_out", _l),
        ("nparts", _i),
        ("types", _i * MAX_PARTS),
        ("panel", _i * MAX_PARTS),
        ("data", _p * MAX_PARTS),
        ("rows", _l * MAX_PARTS),
        ("row_bytes", _l * MAX_PARTS),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Lin),
        ("o", _Lin),
        ("gate_up", _Lin),
        ("down", _Lin),
        ("in_norm", _p),
        ("post_norm", _p),
        ("q_norm", _p),
        ("k_norm", _p),
        ("k_cache", _p),
        ("v_cache", _p),
        ("attn_out_norm", _p),
        ("ffn_out_norm", _p),
        ("window", _i),
        ("rope", _i),
        ("moe", _p),
    ]


class _Moe(ctypes.Structure):
    _fields_ = [
        ("router", _p),
        ("gate_up", _p),
        ("down", _p),
        ("sh_gate_up", _p),
        ("sh_down", _p),
        ("sh_gate", _p),
        ("experts", _i),
        ("top_k", _i),
        ("inter", _i),
        ("norm_topk", _i),
        ("sh_inter", _i),
    ]


class _Shape(ctypes.Structure):
    _fields_ = [
        ("hidden", _i),
        ("heads", _i),
        ("kv_heads", _i),
        ("head_dim", _i),
        ("inter", _i),
        ("eps", _f),
        ("num_blocks", _l),
        ("block_size", _i),
        ("kv_f16", _i),
        ("scale", _f),
        ("softcap", _f),
        ("resid_mult", _f),
        ("act", _i),
        ("rot", _i),
        ("experts", _i),
        ("top_k", _i),
        ("moe_inter", _i),
    ]


ACTS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1}  # decode.c's gated activations


def _lin(module: nn.Module) -> _Lin:
    """A packed linear module as decode.c's dlin (pointers into its bytes, no copies)."""
    bias = module.bias.data_ptr() if module.bias is not None else None
    return _lin_of(module.quant, bias)


def _lin_of(t: QuantTensor, bias: int | None) -> _Lin:
    """One packed weight as decode.c's dlin: an expert's has no module, so no bias either."""
    rows, n_in = t.shape
    if isinstance(t, BlockTensor):
        lin = _Lin(None, None, None, bias, 0, 0, 0, n_in, rows, len(t.parts))
        panels = t.panels or [None] * len(t.parts)
        for i, ((kind, data), panel) in enumerate(zip(t.parts, panels, strict=True)):
            lin.types[i], lin.panel[i] = GGML_TYPE_IDS[kind], int(panel is not None)
            lin.data[i] = (panel if panel is not None else data).data_ptr()
            lin.rows[i], lin.row_bytes[i] = data.shape[0], data.shape[1]
        return lin
    mins = t.mins.data_ptr() if t.mins is not None else None
    f32 = int(t.fmt.scale_dtype == torch.float32)
    return _Lin(
        t.qweight.data_ptr(), t.scales.data_ptr(), mins, bias, t.fmt.bits, t.fmt.group, f32, n_in,
        rows,
    )  # fmt: skip


def _layout(t: QuantTensor) -> tuple:
    """What decode.c's call on t depends on besides the pointers: one per projection's experts."""
    if isinstance(t, BlockTensor):
        panels = t.panels or [None] * len(t.parts)
        parts = tuple(
            (k, d.shape[0], p is not None) for (k, d), p in zip(t.parts, panels, strict=True)
        )
        return (tuple(t.shape), parts)
    return (tuple(t.shape), t.fmt.bits, t.fmt.group, t.fmt.scale_dtype, t.mins is None)


def _moe_fits(m: nn.Module) -> bool:
    """decode.c's MoE block: every expert packed alike per projection, TP 1, float32 gates."""
    ex = m.experts
    for proj in (ex.gate_up_proj, ex.down_proj):
        if proj.quant is None or proj.ctx.size != 1:
            return False
        if len({_layout(q) for q in proj.quant}) != 1:
            return False
    gates = [m.gate.weight] + ([m.shared_expert_gate.weight] if m.shared_expert is not None else [])
    return all(g.dtype == torch.float32 and g.is_contiguous() for g in gates)


def _mlp_linears(m: nn.Module) -> tuple[list[QuantTensor | None], list[nn.Module]]:
    """(the packed weights decode.c reads for one layer's MLP, its nn.Linear-like modules)."""
    if not hasattr(m, "experts"):
        mods = [m.gate_up_proj, m.down_proj]
        return [getattr(x, "quant", None) for x in mods], mods
    ex, sh = m.experts, m.shared_expert
    mods = [sh.gate_up_proj, sh.down_proj] if sh is not None else []
    quants = [getattr(x, "quant", None) for x in mods]
    if not _moe_fits(m):
        return [None], mods
    return [ex.gate_up_proj.quant[0], ex.down_proj.quant[0], *quants], mods


def _moe(m: nn.Module, keep: list) -> _Moe:
    """m's experts as decode.c's dmoe: per-expert tables of pointers into their packed bytes."""
    ex, sh = m.experts, m.shared_expert
    tables = [
        (_Lin * ex.num_experts)(*(_lin_of(q, None) for q in proj.quant))
        for proj in (ex.gate_up_proj, ex.down_proj)
    ]
    moe = _Moe(m.gate.weight.data_ptr(), *map(ctypes.addressof, tables))
    moe.experts, moe.top_k, moe.inter = ex.num_experts, ex.top_k, ex.gate_up_proj.rows[0]
    moe.norm_topk = int(ex.norm_topk_prob)
    if sh is not None:
        shared = (_Lin * 2)(_lin(sh.gate_up_proj), _lin(sh.down_proj))
        moe.sh_gate_up = ctypes.addressof(shared)
        moe.sh_down = moe.sh_gate_up + ctypes.sizeof(_Lin)
        moe.sh_gate = m.shared_expert_gate.weight.data_ptr()
        moe.sh_inter = sh.gate_up_proj.quant.shape[0] // 2
        tables.append(shared)
    keep += [*tables, moe]
    return moe


def _moe_dims(layers: nn.ModuleList) -> tuple[int, int, int, int]:
    """(the widest dense MLP, experts, top-k, expert or shared-expert width): decode.c's scratch."""
    dense, dims = [0], [(0, 0, 0)]
    for m in (layer.mlp for layer in layers):
        if not hasattr(m, "experts"):
            dense.append(m.gate_up_proj.quant.shape[0] // 2)
            continue
        ex, sh = m.experts, m.shared_expert
        shared = sh.gate_up_proj.quant.shape[0] // 2 if sh is not None else 0
        dims.append((ex.num_experts, ex.top_k, max(ex.gate_up_proj.rows[0], shared)))
    return (max(dense), *(max(d[i] for d in dims) for i in range(3)))


def _lib() -> ctypes.CDLL | None:
    return kernels.load()


class FusedDecode:
    """Binds one model's packed weights and KV cache to decode.c (built when the model fits)."""

    def __init__(self, model: nn.Module, block_size: int) -> None:
        inner, cfg = model.model, model.config
        attn0 = inner.layers[0].self_attn
        self.model, self.block_size = model, block_size
        # what the layer table points into: the ctypes tables (experts, dmoe), Gemma's (1 + w)
        self._keep: list = []
        inter, experts, top_k, moe_inter = _moe_dims(inner.layers)
        self.shape = _Shape(
            cfg.hidden_size,
            attn0.num_heads,
            attn0.num_kv_heads,
            attn0.head_dim,
            inter,
            inner.norm.eps,
            attn0.attn.k_cache.shape[1],
            block_size,
            int(attn0.attn.k_cache.dtype == torch.float16),
            attn0.attn.scale,
            attn0.attn.logits_soft_cap or 0.0,
            cfg.residual_multiplier,
            ACTS[cfg.hidden_act],
            inner.rotary_emb.rotary_dim,
            experts,
            top_k,
            moe_inter,
        )
        self.layers = (_Layer * len(inner.layers))(*map(self._layer, inner.layers))
        self.final_norm = self._norm(inner.norm)
        self.scratch = torch.empty(0)

    def _norm(self, norm: nn.Module | None) -> int | None:
        """The weight decode.c multiplies by: w, or Gemma's 1 + w computed as the torch norm is."""
        if norm is None:
            return None
        if not getattr(norm, "offset", 0.0):
            return norm.weight.data_ptr()
        self._keep.append((norm.offset + norm.weight.float()).contiguous())
        return self._keep[-1].data_ptr()

    def _layer(self, layer: nn.Module) -> _Layer:
        """One decoder layer's pointers (a MoE layer's experts in a dmoe, its dense MLP empty)."""
        a, m = layer.self_attn, layer.mlp
        sparse = hasattr(m, "experts")
        sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma: norms after each branch
        local = a.is_sliding and self.model.model.rotary_emb_local is not None
        mid = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
        return _Layer(
            _lin(a.qkv_proj),
            _lin(a.o_proj),
            _Lin() if sparse else _lin(m.gate_up_proj),
            _Lin() if sparse else _lin(m.down_proj),
            self._norm(layer.input_layernorm),
            self._norm(mid),
            self._norm(a.q_norm),
            self._norm(a.k_norm),
            a.attn.k_cache.data_ptr(),
            a.attn.v_cache.data_ptr(),
            self._norm(layer.post_attention_layernorm) if sandwich else None,
            self._norm(layer.post_feedforward_layernorm) if sandwich else None,
            a.attn.sliding_window or 0,
            (1 if local else 0) if a.uses_rope else -1,
            ctypes.addressof(_moe(m, self._keep)) if sparse else None,
        )

    @staticmethod
    def build(model: nn.Module, block_size: int) -> FusedDecode | None:
        """A FusedDecode when every piece fits decode.c, else None (the torch path serves)."""
        inner = getattr(model, "model", None)
        if inner is None or _lib() is None:
            return None
        for layer in inner.layers:
            a = layer.self_attn
            mlp_quants, mlp_mods = _mlp_linears(layer.mlp)
            quants = [getattr(x, "quant", None) for x in (a.qkv_proj, a.o_proj)] + mlp_quants
            if any(q is None for q in quants):
                return None
            blocks = [q for q in quants if isinstance(q, BlockTensor)]
            if blocks and (
                len(blocks) < len(quants) or any(len(q.parts) > MAX_PARTS for q in blocks)
            ):
                return None
            if a.o_proj.ctx.size != 1 or a.attn.backend != "sdpa" or a.attn.k_cache is None:
                return None
            if a.attn.k_cache.dtype not in KV_DTYPES or a.attn.k_cache.device.type != "cpu":
                return None
            if a.q_norm is not None and a.q_norm.weight.numel() != a.head_dim:
                return None  # OLMoE's q/k norms span every head
            if any(x.bias is not None for x in (a.o_proj, *mlp_mods)):
                return None
        return FusedDecode(model, block_size)

    @staticmethod
    def takes(query_lens: list[int]) -> bool:
        """Any step with rows: decode rows, prompt chunks and mixes of both."""
        return sum(query_lens) > 0

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, hidden] (norm in C too)."""
        inner = self.model.model
        b = input_ids.shape[0]
        h = inner.embed(input_ids).contiguous()  # [T, hidden] (Gemma's and Granite's scaled)
        cos, sin = inner.rotary_emb.cos_sin(positions, torch.float32)  # [T, 1, rot] each
        cos_l, sin_l = cos, sin
        if inner.rotary_emb_local is not None:  # Gemma 3's sliding layers
            cos_l, sin_l = inner.rotary_emb_local.cos_sin(positions, torch.float32)
        residual = torch.empty_like(h)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int32
        )  # [S, max_blocks]
        row_seq, row_ctx = [], []  # each row's sequence, and the keys it sees (itself included)
        for i, (q, c) in enumerate(zip(query_lens, context_lens, strict=True)):
            row_seq += [i] * q
            row_ctx += range(c - q + 1, c + 1)
        slots = torch.tensor(slot_mapping, dtype=torch.long)
        ctx = torch.tensor(row_ctx, dtype=torch.int32)
        seqs = torch.tensor(row_seq, dtype=torch.int32)
        max_ctx = max(row_ctx)
        threads = torch.get_num_threads()
        lib = _lib()
        need = lib.decode_scratch(ctypes.byref(self.shape), b, max_ctx, threads)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need)
        rc = lib.decode_layers(
            len(self.layers), self.layers, self.final_norm, ctypes.byref(self.shape),
            h.data_ptr(), residual.data_ptr(), b, cos.data_ptr(), sin.data_ptr(), cos_l.data_ptr(),
            sin_l.data_ptr(), slots.data_ptr(),
            ctx.data_ptr(), tables.data_ptr(), seqs.data_ptr(), max_blocks,
            self.scratch.data_ptr(), max_ctx, threads,
        )  # fmt: skip
        if rc != 0:
            raise ValueError(
                f"decode_layers refused the step: {b} rows, query_lens {query_lens}, contexts "
                f"{context_lens}, {max_blocks} blocks of {self.block_size}"
            )
        return h
