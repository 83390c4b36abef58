"""Mixture-of-experts families (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE) on tiny random checkpoints:
transformers parity from the folder and from llama.cpp's conversion, packed GGUF experts, TP=2,
and batch invariance (a token's expert outputs never depend on the rows beside it)."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.layers.qdot import BlockTensor
from model.models import MODELS
from model.parallel import ParallelContext
from model.runner import ModelRunner
from tests.model.conftest import MOE_FAMILIES, MOE_LAYOUTS
from tests.model.test_families_parity import Driver, check_against_transformers, load_pair, prompt
from tests.model.test_gguf_families import reference

CLASSES = {
    "qwen3_moe_mlp_only": "Qwen3MoeForCausalLM",
    "qwen2_moe_step2": "Qwen2MoeForCausalLM",
    "qwen2_moe_shared64": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
KW = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20)


def moe_layers(runner: ModelRunner) -> list:
    return [layer.mlp for layer in runner.model.model.layers if hasattr(layer.mlp, "experts")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", MOE_FAMILIES + tuple(MOE_LAYOUTS))
def test_moe_family_matches_transformers(family_checkpoint, family: str) -> None:
    runner, hf = load_pair(family_checkpoint(family))
    assert type(runner.model).__name__ == CLASSES[family]
    assert runner.model.fits_fused_decode == (family != "olmoe")  # OLMoE: norms over every head
    assert runner.fused is None  # float experts: the torch modules serve
    sparse = [hasattr(layer.mlp, "experts") for layer in runner.model.model.layers]
    want = {
        "qwen3_moe_mlp_only": [True, True, False, True],
        "qwen2_moe_step2": [False, True, False, True],
    }
    assert sparse == want.get(family, [True] * 4)  # mlp_only_layers, decoder_sparse_step
    check_against_transformers(runner, hf)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_transformers_in_memory_layout_loads_the_same(family_checkpoint, family: str) -> None:
    """transformers 5 keeps experts stacked in memory (experts.gate_up_proj [E, 2 * inter,
    hidden], experts.down_proj, mlp.* for Mixtral too): that state_dict loads the same weights
    as the per-expert tensors on disk."""
    from model.loader import load_weights
    from model.runner import materialize

    runner, hf = load_pair(family_checkpoint(family))
    names = list(hf.state_dict())
    assert any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
    with torch.device("meta"):
        net = MODELS[runner.model_config.architecture](runner.model_config)
    net = materialize(net, torch.device("cpu"), torch.float32)
    load_weights(net, hf.state_dict().items())
    ours = dict(runner.model.named_parameters())
    for name, p in net.named_parameters():
        assert torch.equal(p, ours[name]), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_converted_gguf_matches_transformers(family_gguf, family_checkpoint, family) -> None:
    """llama.cpp's stacked ffn_*_exps tensors, its router and shared-expert names; a layer with
    no router (Qwen3-MoE's mlp_only_layers) is found dense from the file's tensors."""
    runner = ModelRunner(str(family_gguf(family)), **KW)
    assert type(runner.model).__name__ == CLASSES[family]
    assert runner.fused is None  # float32 files: float experts, the torch modules serve
    check_against_transformers(runner, reference(family_checkpoint(family), family))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_q8_0_experts_stay_packed(family_gguf, family) -> None:
    """Each expert keeps the file's Q8_0 bytes (no float copy, no stacked float parameter): the
    float kernel serves the dequantized file's log-probs; the int8 path its blocks."""
    path = str(family_gguf(family, "q8_0"))
    ids = prompt(37, seed=1)
    out = {}
    for name, kw in (
        ("float", dict(activation_dtype="float32")),
        ("int8", dict(activation_dtype="int8")),
        ("none", dict(quantization="none")),
    ):
        runner = ModelRunner(path, **KW, **kw)
        for mlp in moe_layers(runner):
            for proj in (mlp.experts.gate_up_proj, mlp.experts.down_proj):
                if name == "none":
                    assert proj.quant is None and proj.weight is not None
                    continue
                assert proj.weight is None and len(proj.quant) == proj.num_experts
                assert isinstance(proj.quant[0], BlockTensor) == (name == "int8")
                # Q8_0: 34 bytes per 32 weights (the panels of the int8 path hold the same)
                rows, cols = sum(proj.rows), proj.cols
                assert proj.quant.nbytes <= 1.1 * proj.num_experts * rows * cols * 34 / 32
        logits = runner.compute_logits(Driver(runner).step([("a", ids, 0)]))[0]
        out[name] = logits.log_softmax(-1)
    torch.testing.assert_close(out["float"], out["none"], atol=1e-4, rtol=0)
    # int8 activations (every linear, dense or expert) round each row per block: near, not equal
    assert out["int8"].argmax() == out["none"].argmax()
    torch.testing.assert_close(out["int8"], out["none"], atol=0.25, rtol=0)


def test_tp_ranks_hold_every_experts_slice(family_checkpoint) -> None:
    """Experts split along their intermediate dimension: each rank holds all 8 experts' halves;
    the router is replicated."""
    from model.hf_weights import load_hf_config

    cfg = ModelConfig.from_hf_dict(load_hf_config(str(family_checkpoint("qwen2_moe"))))
    with torch.device("meta"):
        shards = [MODELS[cfg.architecture](cfg, ParallelContext(r, 2)) for r in range(2)]
    for shard in shards:
        mlp = shard.model.layers[0].mlp
        assert tuple(mlp.experts.gate_up_proj.weight.shape) == (8, 32, 64)  # 2 x 32 / 2
        assert tuple(mlp.experts.down_proj.weight.shape) == (8, 64, 16)
        assert tuple(mlp.gate.weight.shape) == (8, 64)
        assert mlp.shared_expert.down_proj.input_size_per_rank == 24


def test_olmoe_ranks_keep_their_heads(family_checkpoint) -> None:
    """OLMoE at TP=4 (4 heads, 2 KV heads): whole q/k/v projections on every rank, one q head
    each, KV heads shared by pairs of ranks; o_proj split by columns."""
    from model.hf_weights import load_hf_config

    cfg = ModelConfig.from_hf_dict(load_hf_config(str(family_checkpoint("olmoe"))))
    with torch.device("meta"):
        shards = [MODELS[cfg.architecture](cfg, ParallelContext(r, 4)) for r in range(4)]
    for r, shard in enumerate(shards):
        attn = shard.model.layers[0].self_attn
        assert tuple(attn.qkv_proj.weight.shape) == (4 * 16 + 2 * 2 * 16, 64)
        assert attn.q_heads == (r, 1) and attn.kv_heads == (r // 2, 1)
        assert (attn.attn.num_heads, attn.attn.num_kv_heads) == (1, 1)
        assert attn.o_proj.input_size_per_rank == 16


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tp2_moe_greedy_identical(family_checkpoint, family: str) -> None:
    """Experts split along their width; OLMoE's ranks project every head (its q/k norms span
    them) and attend with their own."""
    from tests.model.test_tensor_parallel import assert_same_greedy, tp

    folder = str(family_checkpoint(family))
    r1, r2 = ModelRunner(folder, **KW), tp(folder, 2, **KW)
    try:
        assert_same_greedy(r1, r2, [prompt(12, 4), prompt(30, 5)])
    finally:
        r2.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_tp2_packed_gguf_greedy_identical(family_gguf, family: str) -> None:
    """Each rank converts its rows (gate_up) and columns (down) of every expert from the stacked
    Q8_0 tensor; Qwen3-MoE's 16 columns a rank split Q8_0's 32-blocks, so its down projections
    are float there (as a RowParallelLinear's would be), Mixtral's stay packed."""
    from tests.model.test_tensor_parallel import assert_same_greedy, tp

    path = str(family_gguf(family, "q8_0"))
    kw = KW | {"activation_dtype": "float32"}  # the exact path: TP must not change a bit of it
    r1, r2 = ModelRunner(path, **kw), tp(path, 2, **kw)
    try:
        assert_same_greedy(r1, r2, [prompt(12, 4), prompt(30, 5)])
    finally:
        r2.shutdown()


# -- batch invariance ----------------------------------------------------------------------------


def assert_rows_invariant(mlp: torch.nn.Module, x: torch.Tensor) -> None:
    """The routed experts' output for each row equals that row's output alone, bitwise."""
    with torch.inference_mode():
        batched = mlp.experts(x, mlp.gate(x))
        for i in range(x.shape[0]):
            alone = mlp.experts(x[i : i + 1], mlp.gate(x[i : i + 1]))
            assert torch.equal(batched[i : i + 1], alone), f"row {i}"


@pytest.mark.timeout(120)
def test_experts_are_row_invariant_float(family_checkpoint) -> None:
    runner = ModelRunner(str(family_checkpoint("mixtral")), **KW)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    for mlp in moe_layers(runner):
        assert_rows_invariant(mlp, x)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_experts_are_row_invariant_packed(family_gguf, activation_dtype: str) -> None:
    """Packed experts: quant.c's float kernel (up to KERNEL_MAX_ROWS rows a call) and qdot.c's
    int8 kernel (activations quantized per row) give each row the same bits in any batch."""
    path = str(family_gguf("qwen3_moe", "q8_0"))
    runner = ModelRunner(path, **KW, activation_dtype=activation_dtype)
    x = torch.randn(80, 64, generator=torch.Generator().manual_seed(0))
    for mlp in moe_layers(runner):
        assert_rows_invariant(mlp, x)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_one_request_alone_and_among_others(family_gguf, activation_dtype: str) -> None:
    """The same prompt and greedy decode steps alone, then beside 15 other sequences (their
    prefills sharing its steps): the same tokens, and log-probs as close as the dense layers
    allow (MKL's float GEMMs and attention are not bitwise across batches; the experts are)."""
    path = str(family_gguf("qwen3_moe", "q8_0"))
    runner = ModelRunner(path, **KW, activation_dtype=activation_dtype)
    ids = prompt(21, seed=9)
    runs = []
    for others in (0, 15):
        drv = Driver(runner, seed=others)
        chunks = [("me", ids, 0)] + [(f"o{i}", prompt(5 + i, 100 + i), 0) for i in range(others)]
        seqs = {sid: list(toks) for sid, toks, _ in chunks}
        got = []
        for _ in range(8):
            logits = runner.compute_logits(drv.step(chunks))
            got.append(logits[0].log_softmax(-1))
            for (sid, _, _), row in zip(chunks, logits, strict=True):
                seqs[sid].append(int(row.argmax()))
            chunks = [(sid, s[-1:], len(s) - 1) for sid, s in seqs.items()]
        runs.append((seqs["me"], torch.stack(got)))
    (alone, a), (among, b) = runs
    assert alone == among
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_folder_packs_experts_and_decode_c_serves(family_checkpoint, quantization):
    """--quantization packs every expert of an HF folder, and decode.c's MoE block serves the
    model (tests/model/test_fused_moe.py compares it with the torch modules)."""
    folder = str(family_checkpoint("mixtral"))
    runner = ModelRunner(folder, **KW, quantization=quantization)
    assert runner.fused is not None and runner.model.fits_fused_decode
    for mlp in moe_layers(runner):
        assert mlp.experts.gate_up_proj.weight is None and mlp.experts.down_proj.quant is not None
    ids = prompt(30, seed=2)
    got = runner.compute_logits(Driver(runner).step([("a", ids, 0)]))[0]
    assert torch.isfinite(got).all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_quantization_keeps_routers_float(family_checkpoint, family: str) -> None:
    """--quantization int8 packs the experts but, as llama.cpp, not the router (Mixtral's named
    block_sparse_moe.gate in the stream) nor Qwen2-MoE's shared-expert gate: both stay the
    checkpoint's float weights, bit for bit."""
    from model.layers.quant import QuantTensor
    from model.runner import _quantize_stream, open_checkpoint

    folder = str(family_checkpoint(family))
    runner = ModelRunner(folder, **KW, quantization="int8")
    _, _, tensors = open_checkpoint(folder)
    stream = tensors(False)
    want = dict(runner.model.adapt_weights(stream))
    gates = ["gate", "shared_expert_gate"] if family == "qwen2_moe" else ["gate"]
    for i, layer in enumerate(runner.model.model.layers):
        assert layer.mlp.experts.down_proj.quant is not None
        for gate in gates:
            module = getattr(layer.mlp, gate)
            assert getattr(module, "quant", None) is None
            assert isinstance(module.weight, torch.nn.Parameter)
            assert module.weight.dtype == torch.float32
            assert torch.equal(module.weight, want[f"model.layers.{i}.mlp.{gate}.weight"])
    w = torch.randn(8, 64)
    names = ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.gate.weight",
             "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.0.mlp.shared_expert.gate_proj.weight"]  # fmt: skip
    out = dict(_quantize_stream(((n, w) for n in names), 8, blocks=False))
    assert [isinstance(out[n], QuantTensor) for n in names] == [False, False, False, True, True]
    assert all(out[n] is w for n in names[:3])


@pytest.mark.timeout(300)
def test_engine_batch_gives_each_prompt_its_alone_tokens(family_gguf) -> None:
    """Through the scheduler (mixed prefill and decode steps, int8 activations on packed Q8_0
    experts): each of 6 greedy requests gets the tokens it gets alone."""
    from model.sampling_params import SamplingParams
    from scheduler.llm import LLM

    path = str(family_gguf("qwen3_moe", "q8_0"))
    llm = LLM(
        path, **KW, activation_dtype="int8", max_num_batched_tokens=32, enable_prefix_caching=False
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [prompt(n, seed=20 + n) for n in (3, 9, 17, 25, 30, 41)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone and all(len(t) == 12 for t in batched)


def test_missing_or_misshapen_experts_are_named(family_checkpoint) -> None:
    """A checkpoint that lacks one expert's up_proj, or stacks the wrong expert count, fails
    with the parameter and the numbers in the message."""
    from model.hf_weights import iterate_hf_weights, load_hf_config
    from model.layers.experts import ExpertLinear
    from model.loader import WeightLoadError, load_weights
    from model.runner import materialize

    folder = str(family_checkpoint("qwen3_moe"))
    cfg = ModelConfig.from_hf_dict(load_hf_config(folder))
    with torch.device("meta"):
        net = MODELS[cfg.architecture](cfg)
    net = materialize(net, torch.device("cpu"), torch.float32)
    stream = (
        (n, t)
        for n, t in iterate_hf_weights(folder)
        if n != "model.layers.1.mlp.experts.5.up_proj.weight"
    )
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_weights(net, stream)
    proj = ExpertLinear(8, 64, [32, 32], column=True)
    with pytest.raises(ValueError, match=r"expected \[8, out, in\], got \(3, 32, 64\)"):
        proj.weight_loader(proj.weight, torch.zeros(3, 32, 64), 0)


def test_gguf_config_finds_dense_layers_and_llama_cpp_routing() -> None:
    """No converter writes a Qwen3-MoE with dense layers, so the metadata is checked alone: a
    block without ffn_gate_inp is dense; llama.cpp's norm_w per architecture, unless the file
    says expert_weights_norm; a `llama` file with experts is Mixtral."""
    from model.gguf_config import _moe_config

    base = {"num_hidden_layers": 4, "intermediate_size": 128}
    fields = {"qwen3moe.expert_count": 8, "qwen3moe.expert_used_count": 2,
              "qwen3moe.expert_feed_forward_length": 32}  # fmt: skip
    tensors = {f"blk.{i}.ffn_gate_inp.weight": None for i in (0, 1, 3)}
    got = _moe_config(fields, "qwen3moe", base, tensors)
    assert got["mlp_only_layers"] == [2] and got["norm_topk_prob"] is True
    assert (got["num_experts"], got["num_experts_per_tok"], got["moe_intermediate_size"]) == (
        8,
        2,
        32,
    )
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": 10,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            **base,
            **got,
        }  # fmt: skip
    )
    assert cfg.moe_layers == (True, True, False, True)
    olmoe = {
        "olmoe.expert_count": 8,
        "olmoe.expert_used_count": 2,
        "olmoe.expert_weights_norm": True,
    }
    assert _moe_config(olmoe, "olmoe", base, tensors | {"blk.2.ffn_gate_inp.weight": None})[
        "norm_topk_prob"
    ]
    mixtral = _moe_config(
        {"llama.expert_count": 4, "llama.expert_used_count": 2}, "llama", base, {}
    )
    assert mixtral["architectures"] == ["MixtralForCausalLM"] and mixtral["norm_topk_prob"]
    assert mixtral["moe_intermediate_size"] == 128
    assert _moe_config({}, "llama", base, {}) == {}  # plain Llama


def test_gguf_expert_tensor_names() -> None:
    from model.gguf_weights import gguf_to_hf_name

    assert gguf_to_hf_name("blk.3.ffn_up_exps.weight", "qwen3moe") == (
        "model.layers.3.mlp.experts.up_proj.weight"
    )
    assert gguf_to_hf_name("blk.0.ffn_gate_inp_shexp.weight", "qwen2moe") == (
        "model.layers.0.mlp.shared_expert_gate.weight"
    )
    # older Mixtral conversions: per-expert tensors, loaded through expert_params_mapping
    assert gguf_to_hf_name("blk.2.ffn_down.7.weight", "llama") == (
        "model.layers.2.mlp.experts.7.down_proj.weight"
    )
