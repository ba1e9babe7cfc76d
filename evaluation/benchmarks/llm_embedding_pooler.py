"""Cost of each pooling arm of "Pooling And Attention" relative to the base decoder's forward pass.

For every arm (Model 1-5) the decoder's forward and the pooler's forward (on what the arm feeds it) are timed in
alternation on the same model, and their ratio is the arm's overhead; both are counted too (FlopCounterMode:
matmul-like ops only).
The paper-size pooler (768 latents, 32 heads x 2048) is used as the official code builds it at the decoder's
width. No LoRA (it is merged for inference). Random weights: speed does not depend on their values.

    python evaluation/benchmarks/llm_embedding_pooler.py [--decoder qwen2-0.5b] [--sequence-length 512]
        [--batch-size 1] [--dtype float32] [--repeats 3] [--threads N] [--flops-only mistral-7b] [--json out.json]

`--flops-only mistral-7b` adds FLOP counts (no timing) at the paper's main size, built on the meta device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch

import hfpapers
from hfpapers.methods.llm_embedding import ARMS
from hfpapers.testing.benchmark import count_flops, interleaved_medians


def build(decoder: str, pooling: str, attention: str, dtype):
    model = hfpapers.create_model("llm-embedding", f"{decoder}-model-1", pooling=pooling, attention=attention,
                                  lora_r=0, max_length=1 << 20)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(model, batch_size: int, length: int, device=None):
    vocab = model.config.decoder_config.vocab_size
    ids = torch.randint(vocab, (batch_size, length), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def measure(decoder: str, args, dtype) -> list[dict]:
    """Per arm: the decoder's forward and the pooling's (the pooler, or nothing for Model 1), timed in
    alternation on the same model; the overhead is their ratio."""
    rows = []
    for arm, values in ARMS.items():
        model = build(decoder, values["pooling"], values["attention"], dtype)
        batch = inputs(model, args.batch_size, args.sequence_length)
        with torch.no_grad():
            states = model(**batch).pooler_inputs
            mask = batch["attention_mask"] if states.shape[1] == args.sequence_length else None
            steps = {"decoder": lambda: model(**batch) if model.pooler is None else model.decoder(**batch)}
            if model.pooler is not None:
                steps["pooler"] = lambda: model.pooler(states, mask)
            seconds = {name: median.seconds for name, median in interleaved_medians(steps, 1, args.repeats).items()}
            row = {"arm": arm, "attention": values["attention"], "pooler_inputs": list(states.shape[1:]),
                   "decoder_seconds": seconds["decoder"], "decoder_gflops": count_flops(steps["decoder"]) / 1e9}
            if model.pooler is not None:
                row.update(pooler_seconds=seconds["pooler"], pooler_gflops=count_flops(steps["pooler"]) / 1e9,
                           pooler_params=sum(p.numel() for p in model.pooler.parameters()),
                           overhead=seconds["pooler"] / seconds["decoder"])
        rows.append(row)
        del model
        gc.collect()
    return rows


def flops_only(decoder: str, args) -> list[dict]:
    """FLOPs of the decoder and of each arm's pooler at `decoder` size, counted on the meta device (no mask:
    every token is real, as in the timed runs)."""
    rows = []
    for arm, values in ARMS.items():
        with torch.device("meta"), torch.no_grad():
            model = build(decoder, values["pooling"], values["attention"], torch.float32)
            ids = torch.zeros(args.batch_size, args.sequence_length, dtype=torch.long)
            decoder_gflops = count_flops(lambda: model.decoder(input_ids=ids)) / 1e9
            pooler_gflops = 0.0
            if model.pooler is not None:
                hidden = model.config.decoder_config.hidden_size
                n = {"trainable": 1 if values["attention"] == "causal" else args.sequence_length,
                     "multi_layer_trainable": model.config.decoder_config.num_hidden_layers}[values["pooling"]]
                states = torch.zeros(args.batch_size, n, hidden)
                pooler_gflops = count_flops(lambda: model.pooler(states)) / 1e9
        rows.append({"arm": arm, "decoder_gflops": decoder_gflops, "pooler_gflops": pooler_gflops,
                     "flop_fraction": pooler_gflops / decoder_gflops})
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", default="qwen2-0.5b", choices=["tiny", "qwen2-0.5b", "mistral-7b"])
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--flops-only", choices=["qwen2-0.5b", "mistral-7b"])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {args.decoder}, batch {args.batch_size} x {args.sequence_length} tokens, {args.dtype}, "
          f"{args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}\n")
    rows = measure(args.decoder, args, getattr(torch, args.dtype))
    print("| arm | attention | pooler input (n x d) | decoder s | decoder GFLOP | pooler params | pooler s | "
          "pooler GFLOP | pooler time / decoder time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        pooled = " x ".join(map(str, row["pooler_inputs"]))
        cells = [f"{row['pooler_params'] / 1e6:.1f}M", f"{row['pooler_seconds']:.3f}", f"{row['pooler_gflops']:.1f}",
                 f"{100 * row['overhead']:.1f}%"] if "overhead" in row else ["-", "-", "0", "0% (EOS state only)"]
        print(f"| {row['arm']} | {row['attention']} | {pooled} | {row['decoder_seconds']:.3f} | "
              f"{row['decoder_gflops']:.1f} | " + " | ".join(cells) + " |")
    result = {"decoder": args.decoder, "rows": rows}
    if args.flops_only:
        flop_rows = flops_only(args.flops_only, args)
        print(f"\nFLOPs at {args.flops_only} size (counted, not timed):\n")
        print("| arm | decoder GFLOP | pooler GFLOP | pooler / decoder |")
        print("|---|---|---|---|")
        for row in flop_rows:
            print(f"| {row['arm']} | {row['decoder_gflops']:.0f} | {row['pooler_gflops']:.0f} | "
                  f"{100 * row['flop_fraction']:.1f}% |")
        result["flops_only"] = {"decoder": args.flops_only, "rows": flop_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
