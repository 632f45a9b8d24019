"""`python -m mmcoconut.cli.sizing`: the largest micro-batch per GPU memory size from the memory model
(mmcoconut/sizing.py), as a markdown table; `--explain MODEL:B` prints every term for one micro-batch;
`--ds-config FILE` takes the ZeRO stage, precision, buckets and world size from a ds_config."""
from __future__ import annotations

import argparse
import json
import sys

from mmcoconut.sizing import GIB, LMS, VISIONS, Setup, breakdown, max_micro_batch


def _from_ds_config(path: str) -> dict:
    ds = json.loads(open(path).read())
    z = ds.get("zero_optimization", {})
    world = ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    precision = "fp16" if ds.get("fp16", {}).get("enabled") else "bf16" if ds.get("bf16", {}).get("enabled") \
        else "fp32"
    kw = {"zero": int(z.get("stage", 0)), "world": world, "precision": precision}
    for key, field in (("reduce_bucket_size", "reduce_bucket"), ("allgather_bucket_size", "allgather_bucket"),
                       ("stage3_max_live_parameters", "max_live_params")):
        if key in z:
            kw[field] = float(z[key])
    kw["offload"] = z.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    if precision == "bf16":
        kw["grad_accum_fp32"] = ds.get("data_types", {}).get("grad_accum_dtype", "fp32") == "fp32"
    return kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(LMS), help=f"comma-separated, of {', '.join(LMS)}")
    ap.add_argument("--gpus", default="24,40,80", help="GPU memory sizes in GB (about GiB on the card)")
    ap.add_argument("--seq", type=int, default=256, help="padded sequence length, image tokens included")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--setups", default="1x1,3x8", help="ZeRO stage x world size, comma-separated")
    ap.add_argument("--latent-passes", type=int, default=6, help="one-column latent passes (stage x c_thought)")
    ap.add_argument("--vision", default="clip-b32", choices=list(VISIONS))
    ap.add_argument("--ds-config", default=None, help="take stage, precision, buckets and world from this file")
    ap.add_argument("--explain", default=None, metavar="MODEL:B", help="every term for one micro-batch")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in LMS]
    if unknown:
        print(f"error: --models: unknown {unknown}; choose from {list(LMS)}", file=sys.stderr)
        return 2
    base = {"seq": args.seq, "precision": args.precision, "latent_passes": args.latent_passes,
            "vision": VISIONS[args.vision]}
    setups = [tuple(int(x) for x in s.split("x")) for s in args.setups.split(",")]
    if args.ds_config:
        kw = _from_ds_config(args.ds_config)
        base.update({k: v for k, v in kw.items() if k not in ("zero", "world")})
        setups = [(kw["zero"], kw["world"])]
    if args.explain:
        key, _, batch = args.explain.partition(":")
        if key not in LMS or not batch.isdigit():
            print(f"error: --explain wants MODEL:B with MODEL in {list(LMS)}, got {args.explain!r}", file=sys.stderr)
            return 2
        zero, world = setups[0]
        s = Setup(LMS[key], zero=zero, world=world, **base)
        for name, value in breakdown(s, int(batch)).items():
            print(f"{name:12s} {value / GIB:8.2f} GiB")
        return 0
    gpus = [float(g) for g in args.gpus.split(",")]
    print(f"Largest micro-batch per GPU: seq {args.seq}, {args.precision}, {args.latent_passes} latent passes, "
          f"{VISIONS[args.vision].name} (mmcoconut/sizing.py; estimates)\n")
    print("| model | params | ZeRO | GPUs | " + " | ".join(f"{g:g} GB" for g in gpus) + " |")
    print("|---|---|---|---|" + "---|" * len(gpus))
    for key in models:
        for zero, world in setups:
            s = Setup(LMS[key], zero=zero, world=world, **base)
            cells = [max_micro_batch(s, g) for g in gpus]
            print(f"| {LMS[key].name} | {LMS[key].params / 1e9:.2f} B | {zero} | {world} | "
                  + " | ".join(str(c) if c else "does not fit" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
