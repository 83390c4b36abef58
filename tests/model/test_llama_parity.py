"""Our paged-KV Llama/Qwen2 vs transformers: prompt logits, decode logits, greedy tokens, mixes."""

from __future__ import annotations

import random

import pytest
import torch

from model.inputs import StepInput
from model.layers.attention import AttentionMetadata
from model.runner import ModelRunner

CASES = [("llama", False), ("llama", True), ("llama3", False), ("qwen2", False), ("qwen2", True)]
ATOL = 1e-4


class Driver:
    """Test stand-in for the scheduler: hands out shuffled blocks and builds StepInputs."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        self.bs = runner.block_size
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


def load_pair(folder) -> tuple[ModelRunner, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    runner = ModelRunner(str(folder), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return runner, hf


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("arch", "tie"), CASES)
def test_prompt_decode_and_greedy_match_transformers(tiny_checkpoint, arch: str, tie: bool) -> None:
    runner, hf = load_pair(tiny_checkpoint(arch, tie))
    ids = prompt(37, seed=1)

    # whole-prompt logits (every position, not just the last)
    meta = AttentionMetadata.build([37], [37], [[0, 1, 2]], list(range(37)), runner.block_size)
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids), torch.arange(37), meta)
        ours = runner.model.compute_logits(hidden)
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)

    # prefill + 64 greedy decode steps through the runner and the paged cache
    drv = Driver(runner)
    logits = [runner.compute_logits(drv.step([("a", ids, 0)]))[0]]
    tokens = list(ids)
    for _ in range(64):
        tokens.append(int(logits[-1].argmax()))
        logits.append(runner.compute_logits(drv.step([("a", [tokens[-1]], len(tokens) - 1)]))[0])
    ref = hf_logits(hf, tokens)  # [37 + 64, vocab]
    torch.testing.assert_close(torch.stack(logits[:33]), ref[36:69], atol=ATOL, rtol=0)
    with torch.no_grad():
        gen = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=64,
            do_sample=False,
            min_new_tokens=64,
            pad_token_id=0,
        )[0].tolist()
    assert tokens == gen


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("qwen2", True)])
def test_mixed_batch_matches_each_alone(tiny_checkpoint, arch: str, tie: bool) -> None:
    runner, hf = load_pair(tiny_checkpoint(arch, tie))
    a, b, c, d = prompt(29, 2), prompt(50, 3), prompt(20, 4), prompt(17, 5)
    drv = Driver(runner, seed=7)
    # step 1: a whole, b's first chunk (32 tokens), d whole
    first = runner.compute_logits(drv.step([("a", a, 0), ("b", b[:32], 0), ("d", d, 0)]))
    a.append(int(first[0].argmax()))
    d.append(int(first[2].argmax()))
    # step 2 (mixed): decode a, b's second chunk after its cached prefix, fresh c, decode d
    step = drv.step([("a", a[-1:], 29), ("b", b[32:], 32), ("c", c, 0), ("d", d[-1:], 17)])
    second = runner.compute_logits(step)
    torch.testing.assert_close(first[0], hf_logits(hf, a[:29])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[1], hf_logits(hf, b[:32])[-1], atol=ATOL, rtol=0)
    for got, seq in zip(second, [a, b, c, d], strict=True):
        torch.testing.assert_close(got, hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)
    # step 3: only decodes of different lengths, each equal to its sequence alone
    nxt = [int(x.argmax()) for x in second]
    seqs = [a + [nxt[0]], b + [nxt[1]], c + [nxt[2]], d + [nxt[3]]]
    third = runner.compute_logits(
        drv.step([(sid, s[-1:], len(s) - 1) for sid, s in zip("abcd", seqs, strict=True)])
    )
    for got, seq in zip(third, seqs, strict=True):
        torch.testing.assert_close(got, hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)
