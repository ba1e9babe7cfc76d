"""torch.compile for every model class, and the bf16 inference path of the GEMM-bound models, against eager fp32.

Part 1, compile (skipped with `--no-compile`): every model class of every registered method of kind "model" or
"diffusers", at its tiny preset, on `hfpapers.testing.tiny.tiny_inputs` (LayerDiffuse's TransparentVAE: random
RGBA, 64 px): `torch.compile(model, fullgraph=True)`; where the graph breaks, the reason's first line and the line
of our code that broke it are printed, and the model is compiled without fullgraph. Then the compiled
forward against eager: the largest absolute difference of the first output, and the speed ratio (interleaved
medians). Compiling takes about a minute per class on an idle 2-core machine (several under load).

Part 2, bf16 (skipped with `--no-bf16`): fp32 eager against `torch.autocast("cpu", torch.bfloat16)` (bf16 GEMMs
and convs; the other ops keep their input's dtype, so a transformer's fp32 residual stream and the norms on it stay
fp32) for the GEMM-bound models at their paper sizes: Scaling MLP B_12-Wi_1024 (batch 64), the embedding pooler
(the paper's 768 latents, 32 x 2048 heads, GEGLU x4, at Qwen2-0.5B's width 896, 24 states in, batch 1) and the
LayerDiffuse transparent decoder (one pass, `--size` pixels; under autocast its bf16 path keeps its two
highest-resolution levels in fp32, `FULL_PRECISION_LEVELS`). Relative error = ||bf16 - fp32|| / ||fp32|| (and the
largest element's error over the largest |fp32|).

    python evaluation/benchmarks/compile_bf16.py [--methods scaling-mlp efficientvim] [--no-compile] [--no-bf16]
        [--threads 2] [--clock wall|cpu] [--repeats 5] [--size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time

import torch

import hfpapers
from hfpapers.testing.benchmark import MachineLoad, interleaved_medians
from hfpapers.testing.tiny import tiny_inputs


def first_output(outputs) -> torch.Tensor:
    if torch.is_tensor(outputs):
        return outputs
    for name in ("logits", "embeddings", "last_hidden_state", "predicted_depth", "rgba"):
        if name in outputs:
            return outputs[name]
    return outputs[0]


def compile_row(record, auto_name: str, args, clock) -> dict:
    torch.manual_seed(0)
    model = hfpapers.create_model(record.slug, preset="tiny", head=auto_name).eval()
    if record.kind == "diffusers":  # the TransparentVAE: straight RGBA in [0, 1]
        inputs = {"rgba": torch.rand(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))}
    else:
        inputs = tiny_inputs(record.task, model.config, batch_size=2)
    row = {"method": record.slug, "class": type(model).__name__, "fullgraph": True, "graph_break": ""}
    with torch.inference_mode():
        eager = first_output(model(**inputs))
        started = time.perf_counter()
        try:
            compiled = torch.compile(model, fullgraph=True)
            out = first_output(compiled(**inputs))
        except Exception as error:  # a graph break under fullgraph: say why, then compile with breaks
            torch._dynamo.reset()
            ours = re.findall(r'File "[^"]*/(hfpapers/[^"]+)", line (\d+)', str(error))
            where = f" at {ours[-1][0]}:{ours[-1][1]}" if ours else ""
            row["fullgraph"], row["graph_break"] = False, str(error).strip().splitlines()[0][:160] + where
            compiled = torch.compile(model)
            out = first_output(compiled(**inputs))
        row["compile_s"] = time.perf_counter() - started
        row["max_abs_diff"] = (out.float() - eager.float()).abs().max().item()
        medians = interleaved_medians({"eager": lambda: model(**inputs), "compiled": lambda: compiled(**inputs)},
                                      1, args.repeats, clock)
    row["speedup"] = medians["eager"].seconds / medians["compiled"].seconds
    torch._dynamo.reset()
    return row


def bf16_models(args):
    """(name, fp32 forward) of the GEMM-bound models at their paper sizes, random weights."""
    torch.manual_seed(0)
    mlp = hfpapers.create_model("scaling-mlp", preset="B_12-Wi_1024").eval()
    x = torch.randn(64, 3, 64, 64)
    yield "Scaling MLP B_12-Wi_1024, batch 64", lambda: mlp(pixel_values=x).logits

    from hfpapers.methods.llm_embedding.configuration_llm_embedding import TrainablePoolerConfig
    from hfpapers.methods.llm_embedding.modeling_llm_embedding import TrainablePooler
    pooler = TrainablePooler(TrainablePoolerConfig(hidden_size=896)).eval()
    for p in pooler.parameters():
        torch.nn.init.normal_(p, std=0.02)
    states = torch.randn(1, 24, 896)
    yield "embedding pooler (768 latents, 896-d), 24 states", lambda: pooler(states)

    from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import TransparentVAEDecoder
    decoder = TransparentVAEDecoder().eval()
    pixel, latent = torch.rand(1, 3, args.size, args.size), torch.randn(1, 4, args.size // 8, args.size // 8)
    yield f"LayerDiffuse decoder {args.size}^2, one pass", lambda: decoder.estimate(pixel, latent)


def bf16_row(name, forward, args, clock) -> dict:
    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward()

    with torch.inference_mode():
        expected, got = forward().double(), autocast().double()
        medians = interleaved_medians({"fp32": forward, "bf16": autocast}, 1, args.repeats, clock)
    diff = got - expected
    return {"model": name, "fp32_s": medians["fp32"].seconds, "bf16_s": medians["bf16"].seconds,
            "speedup": medians["fp32"].seconds / medians["bf16"].seconds,
            "relative_l2_error": (diff.norm() / expected.norm()).item(),
            "max_relative_error": (diff.abs().max() / expected.abs().max()).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", help="compile only these methods' classes (default: all)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU seconds (use with --threads 1 on a machine others keep busy)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512, help="LayerDiffuse decoder image side (multiple of 64)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch._inductor.config.freezing = True  # inference: weights become constants (prepacked for oneDNN)
    compiled_rows, bf16_rows = [], []
    with MachineLoad() as load:
        if not args.no_compile:
            for record in hfpapers.list_methods():
                if record.kind not in ("model", "diffusers") or (args.methods and record.slug not in args.methods):
                    continue
                for auto_name in record.model_classes:
                    compiled_rows.append(compile_row(record, auto_name, args, clock))
                    print(compiled_rows[-1], flush=True)
                    gc.collect()
        if not args.no_bf16:
            for name, forward in bf16_models(args):
                bf16_rows.append(bf16_row(name, forward, args, clock))
                print(bf16_rows[-1], flush=True)
                gc.collect()

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, median of "
          f"{args.repeats}; 1-min load average {load.load_before:.2f} before, {load.load_after:.2f} after; "
          f"{load.wall_s:.0f} s" + ("" if load.background is None else
                                    f"; background {100 * load.background:.0f}% of the CPU time"))
    if compiled_rows:
        print("\n| method | class | fullgraph | compile s | compiled / eager speed | max abs diff | graph break |")
        print("|---|---|---|---|---|---|---|")
        for r in compiled_rows:
            print(f"| {r['method']} | {r['class']} | {'yes' if r['fullgraph'] else 'no'} | {r['compile_s']:.0f} "
                  f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | {r['graph_break'] or '-'} |")
    if bf16_rows:
        print("\n| model | fp32 s | bf16 autocast s | speedup | relative L2 error | max error / max abs |")
        print("|---|---|---|---|---|---|")
        for r in bf16_rows:
            print(f"| {r['model']} | {r['fp32_s']:.3f} | {r['bf16_s']:.3f} | **{r['speedup']:.2f}x** "
                  f"| {r['relative_l2_error']:.1e} | {r['max_relative_error']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                       "load_average_before": load.load_before, "compile": compiled_rows, "bf16": bf16_rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
