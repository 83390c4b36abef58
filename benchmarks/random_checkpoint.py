"""Write a random Llama checkpoint shaped like SmolLM2-135M but with 8 heads / 4 KV heads (of 64).

SmolLM2's 9 heads do not split over 2 ranks, so the TP=2 benchmark runs on this stand-in:

    .venv/bin/python benchmarks/random_checkpoint.py /tmp/smol8
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/offline_throughput.py --model /tmp/smol8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/offline_throughput.py --model /tmp/smol8 \\
        --tensor-parallel-size 2 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from scheduler.config import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", help="folder to write")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    head_dim = 64
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).float().save_pretrained(args.out)
    gguf = default_model_path()
    folder, name = gguf.rsplit("/", 1)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(args.out)


if __name__ == "__main__":
    main()
