"""Every family vs transformers in float32 on tiny random checkpoints: prompt log-probs, chunked
prefill and greedy decode through shuffled paged blocks (windows crossed), mixed batches.

Greedy parity is tie-aware: at the first step where the tokens differ, transformers' own logits
must put the two within 1e-3 (a float32 near-tie), and nothing after it is compared.
"""

from __future__ import annotations

import random

import pytest
import torch

from model.inputs import StepInput
from model.layers.attention import AttentionMetadata
from model.runner import ModelRunner
from tests.model.conftest import FAMILIES, WINDOW

STEPS = 32
LOGPROB_ATOL = 1e-3
CLASSES = {
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3_mm": "Gemma3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mistral": "LlamaForCausalLM",
    "qwen2_yarn": "LlamaForCausalLM",
}


class Driver:
    """Test stand-in for the scheduler: hands out shuffled blocks and builds StepInputs."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner, self.bs = runner, runner.block_size
        self.free = list(range(runner.num_kv_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}

    def step(self, chunks: list[tuple[str, list[int], int]]) -> StepInput:
        """chunks: (seq id, tokens scheduled now, position of the first one); every seq samples."""
        ids, pos, slots, qlens, ctxs, tables = [], [], [], [], [], []
        for sid, toks, start in chunks:
            table = self.tables.setdefault(sid, [])
            end = start + len(toks)
            while len(table) * self.bs < end:
                table.append(self.free.pop())
            ids += toks
            pos += range(start, end)
            slots += [table[p // self.bs] * self.bs + p % self.bs for p in range(start, end)]
            qlens.append(len(toks))
            ctxs.append(end)
            tables.append(list(table))
        return StepInput(ids, pos, slots, qlens, ctxs, tables, list(range(len(chunks))))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def load_pair(folder) -> tuple[ModelRunner, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    runner = ModelRunner(str(folder), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return runner, hf


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]


def hf_greedy(hf: torch.nn.Module, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own incremental greedy loop: (tokens, [steps, vocab] raw logits)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits).float()


def assert_greedy_parity(ours: list[int], logits: torch.Tensor, ref: list[int], ref_logits):
    """Same tokens up to a float32 near-tie; log-probs within LOGPROB_ATOL up to there."""
    assert len(ours) == len(ref) == logits.shape[0] == ref_logits.shape[0]
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        diff = (logits[k].log_softmax(-1) - ref_logits[k].log_softmax(-1)).abs().max().item()
        assert diff < LOGPROB_ATOL, f"step {k}: max |logprob diff| {diff:.2e}"
        if a != b:
            gap = (ref_logits[k, b] - ref_logits[k, a]).item()
            assert gap < 1e-3, f"step {k}: tokenmill {a}, transformers {b} (logit gap {gap:.2e})"
            return


def check_against_transformers(runner: ModelRunner, hf: torch.nn.Module) -> None:
    """Prompt log-probs at every position, then a chunked prefill and greedy decode steps."""
    ids = prompt(37, seed=1)
    # whole-prompt log-probs at every position (37 > the window: the masks bite)
    meta = AttentionMetadata.build([37], [37], [[0, 1, 2]], list(range(37)), runner.block_size)
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(torch.tensor(ids), torch.arange(37), meta))
    torch.testing.assert_close(
        ours.log_softmax(-1), hf_logits(hf, ids).log_softmax(-1), atol=LOGPROB_ATOL, rtol=0
    )

    # prefill in chunks of 13 (each attends to paged context), then greedy decode steps
    drv = Driver(runner)
    for start in (0, 13):
        runner.compute_logits(drv.step([("a", ids[start : start + 13], start)]))
    logits = [runner.compute_logits(drv.step([("a", ids[26:], 26)]))[0]]
    tokens = []
    for _ in range(STEPS - 1):
        tokens.append(int(logits[-1].argmax()))
        step = drv.step([("a", tokens[-1:], len(ids) + len(tokens) - 1)])
        logits.append(runner.compute_logits(step)[0])
    tokens.append(int(logits[-1].argmax()))
    ref_tokens, ref_logits = hf_greedy(hf, ids, STEPS)
    assert_greedy_parity(tokens, torch.stack(logits), ref_tokens, ref_logits)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family_checkpoint, family: str) -> None:
    runner, hf = load_pair(family_checkpoint(family))
    assert type(runner.model).__name__ == CLASSES[family]
    assert runner.fused is None  # float weights: the torch path
    check_against_transformers(runner, hf)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "qwen3"])
def test_mixed_batch_matches_each_alone(family_checkpoint, family: str) -> None:
    """Decodes of different context lengths (one masked decode group), a chunk after its cached
    prefix and a fresh prompt in one step: each row equals its sequence alone."""
    runner, hf = load_pair(family_checkpoint(family))
    a, b, c, d = prompt(29, 2), prompt(50, 3), prompt(20, 4), prompt(5, 5)
    drv = Driver(runner, seed=7)
    first = runner.compute_logits(drv.step([("a", a, 0), ("b", b[:32], 0), ("d", d, 0)]))
    a.append(int(first[0].argmax()))
    d.append(int(first[2].argmax()))
    step = drv.step([("a", a[-1:], 29), ("b", b[32:], 32), ("c", c, 0), ("d", d[-1:], 5)])
    second = runner.compute_logits(step)
    for got, seq in zip(second, [a, b, c, d], strict=True):
        ref = hf_logits(hf, seq)[-1]
        torch.testing.assert_close(
            got.log_softmax(-1), ref.log_softmax(-1), atol=LOGPROB_ATOL, rtol=0
        )
    nxt = [int(x.argmax()) for x in second]
    seqs = [s + [t] for s, t in zip([a, b, c, d], nxt, strict=True)]
    third = runner.compute_logits(
        drv.step([(sid, s[-1:], len(s) - 1) for sid, s in zip("abcd", seqs, strict=True)])
    )
    assert max(len(s) for s in seqs) > WINDOW > min(len(s) for s in seqs)
    for got, seq in zip(third, seqs, strict=True):
        ref = hf_logits(hf, seq)[-1]
        torch.testing.assert_close(
            got.log_softmax(-1), ref.log_softmax(-1), atol=LOGPROB_ATOL, rtol=0
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_graph_padded_decode_keeps_windows(family_checkpoint, family: str) -> None:
    """What a CUDA graph replays, run eagerly on the CPU: the window masks come from the padded
    `keep` mask alone (a graph's metadata has no host lengths); real rows equal the eager step."""
    from model.cuda_graphs import CUDAGraphs

    runner = ModelRunner(
        str(family_checkpoint(family)), dtype="float32", device="cpu", kv_cache_memory=4 << 20
    )
    drv = Driver(runner)
    graphs = CUDAGraphs(runner.model, runner.block_size, runner.max_model_len, drv.free.pop())
    prompts = {f"s{i}": prompt(n, seed=i) for i, n in enumerate([3, 17, 40])}
    runner.forward_step(drv.step([(sid, p, 0) for sid, p in prompts.items()]))
    step = drv.step([(sid, [7 + i], len(p)) for i, (sid, p) in enumerate(prompts.items())])
    with torch.inference_mode():
        b, nb = graphs.shape(step)
        graphs.load(step, b, nb)
        padded = graphs.forward(b, nb)[:3].clone()
        meta = AttentionMetadata.build(
            step.query_lens, step.context_lens, step.block_tables, step.slot_mapping, drv.bs
        )
        eager = runner.model(torch.tensor(step.input_ids), torch.tensor(step.positions), meta)
    assert b > 3 and nb * drv.bs > 41 > WINDOW
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f not in ("qwen2_yarn", "qwen3")] + ["mistral_hd64"]
)
def test_families_run_through_decode_c(family_checkpoint, family) -> None:
    """Every dense family's layer in decode.c: Gemma's sandwich (1 + w) norms, GELU-tanh, soft-cap,
    query_pre_attn_scalar and local RoPE base, sliding windows (the prompts cross WINDOW, in
    prompt chunks and decode rows), NoPE layers, partial rotary, Granite's multipliers; against
    the torch layers on the same steps, float32 activations (both sides round alike)."""
    from model.layers import kernels
    from tests.model.test_fused_decode import assert_steps_match

    if kernels.load() is None:
        pytest.skip("the C kernels did not compile on this machine")
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, quantization="int8")
    runner = ModelRunner(str(family_checkpoint(family)), activation_dtype="float32", **kw)
    fused = runner.fused
    assert fused is not None and runner.model.fits_fused_decode
    drv, ids = Driver(runner), prompt(40, 1)
    for start in (0, 13, 26, 39):  # prompt chunks: each row's window inside decode.c
        step = drv.step([("a", ids[start : start + 13], start)])
        runner.fused = None
        ref = runner.compute_logits(step)
        runner.fused = fused
        torch.testing.assert_close(runner.compute_logits(step), ref, rtol=1e-4, atol=1e-4)
    assert_steps_match(runner, [prompt(37, 1), prompt(3, 2)], 12, atol=1e-4)


@pytest.mark.timeout(120)
def test_yarn_qwen2_decodes_through_decode_c(family_checkpoint) -> None:
    """A Llama-shaped layer with scaled RoPE: decode.c takes the torch cos/sin (yarn's factor
    folded in) and matches the torch layers step by step."""
    from model.layers import kernels
    from tests.model.test_fused_decode import assert_steps_match

    if kernels.load() is None:
        pytest.skip("the C kernels did not compile on this machine")
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, quantization="int8")
    kw["activation_dtype"] = "float32"  # the exact path: both sides round alike
    runner = ModelRunner(str(family_checkpoint("qwen2_yarn")), **kw)
    assert runner.fused is not None and runner.model.model.rotary_emb.attention_scaling > 1.0
    assert_steps_match(runner, [prompt(37, 1), prompt(3, 2)], 16, atol=1e-4)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_qwen3_runs_through_decode_c(family_checkpoint, activation_dtype) -> None:
    """Qwen3's per-head q/k RMSNorm before RoPE in decode.c: prompt chunks and decode steps
    against the torch layers (float32 to rounding; int8 as two int8 roundings)."""
    from model.layers import kernels
    from tests.model.test_fused_decode import assert_steps_match

    if kernels.load() is None:
        pytest.skip("the C kernels did not compile on this machine")
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, quantization="int8")
    runner = ModelRunner(str(family_checkpoint("qwen3")), activation_dtype=activation_dtype, **kw)
    assert runner.fused is not None and runner.model.model.layers[0].self_attn.q_norm is not None
    assert_steps_match(runner, [prompt(37, 1), prompt(3, 2)], 12, int8_tol=0.3, atol=1e-4)
