"""Pair forward time of hfpapers' CroCo against the official `CroCoNet`, same weights, same machine, interleaved.

The official code (github.com/naver/croco, CC BY-NC-SA 4.0) is not part of hfpapers: pass the folder of a checkout
(the one holding `models/croco.py`) with `--official`. Without its compiled CUDA kernel it runs RoPE through its
PyTorch fallback, which recomputes the rotary tables and looks them up in every attention call; ours computes them
once per forward and runs attention through `scaled_dot_product_attention`. For each preset both models get the
same random weights (converted with `convert_croco`), the same pair batch and the same mask (the official random
mask generator is replaced by one returning it); eval mode, `torch.no_grad()`. Calls alternate (official, ours,
official, ...) after `--warmup` untimed rounds, so a busy machine slows both alike; medians per pair are reported.

    python evaluation/benchmarks/croco.py --official /path/to/croco [--presets croco-v1 croco-v2-vitb-small]
        [--batch 4] [--repeats 5] [--warmup 1] [--device cpu] [--dtype float32] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from hfpapers.testing.benchmark import interleaved_medians

# our preset -> the official CroCoNet keywords of the same network
OFFICIAL_KWARGS = {
    "croco-v1": {},
    "croco-v2-vitb-small": {"pos_embed": "RoPE100"},
    "croco-v2-vitb-base": {"pos_embed": "RoPE100", "dec_embed_dim": 768, "dec_num_heads": 12, "dec_depth": 12},
    "croco-v2-vitl-base": {"pos_embed": "RoPE100", "enc_embed_dim": 1024, "enc_depth": 24, "enc_num_heads": 16,
                           "dec_embed_dim": 768, "dec_num_heads": 12, "dec_depth": 12},
}


def _pair(preset: str, batch: int, device: str, dtype: torch.dtype):
    from models.croco import CroCoNet

    from hfpapers.methods.croco.convert_croco import config_from_kwargs, convert_state_dict
    from hfpapers.methods.croco.modeling_croco import CroCoForPretraining, random_mask

    kwargs = OFFICIAL_KWARGS[preset]
    torch.manual_seed(0)
    official = CroCoNet(**kwargs).eval()
    config = config_from_kwargs(kwargs)
    ours = CroCoForPretraining(config).eval()
    ours.load_state_dict(convert_state_dict(official.state_dict(), config))
    official.to(device, dtype), ours.to(device, dtype)
    n = official.patch_embed.num_patches
    mask = random_mask(batch, n, int(config.mask_ratio * n), torch.Generator().manual_seed(0)).to(device)

    class FixedMask(torch.nn.Module):
        def forward(self, x):
            return mask

    official.mask_generator = FixedMask()
    image, reference = torch.randn(2, batch, 3, config.image_size, config.image_size, dtype=dtype, device=device)
    with torch.no_grad():
        difference = (official(image, reference)[0] - ours(image, reference, mask=mask).logits).abs().max().item()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_official():
        with torch.no_grad():
            official(image, reference)
        sync()

    def run_ours():
        with torch.no_grad():
            ours(image, reference, mask=mask)
        sync()

    return run_official, run_ours, difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="folder of a naver/croco checkout (holds models/croco.py)")
    parser.add_argument("--presets", nargs="+", default=["croco-v1", "croco-v2-vitb-small"],
                        choices=sorted(OFFICIAL_KWARGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, args.official)
    rows = []
    print("| preset | batch | official ms/pair | hfpapers ms/pair | speed-up | max abs diff |\n|---|---|---|---|---|---|")
    for preset in args.presets:
        run_official, run_ours, difference = _pair(preset, args.batch, args.device, getattr(torch, args.dtype))
        medians = interleaved_medians({"official": run_official, "ours": run_ours}, args.warmup, args.repeats)
        official_ms = 1000 * medians["official"].seconds / args.batch
        ours_ms = 1000 * medians["ours"].seconds / args.batch
        rows.append({"preset": preset, "batch": args.batch, "official_ms_per_pair": official_ms,
                     "hfpapers_ms_per_pair": ours_ms, "speedup": official_ms / ours_ms, "max_abs_diff": difference,
                     "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()})
        print(f"| {preset} | {args.batch} | {official_ms:.1f} | {ours_ms:.1f} | {official_ms / ours_ms:.2f}x | "
              f"{difference:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
