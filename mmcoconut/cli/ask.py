"""mmcoconut-ask --model DIR --image cat.jpg --question "..." [--choices "a|b|c|d"] [--view coconut]
[--n-latents N] [--show-steps] [--json]

Ask a trained model about one image. DIR: an export (mmcoconut-export) or a DeepSpeed checkpoint. Prints the
answer (the chosen choice with --choices), the written reasoning with --show-steps, or everything as one JSON
object with --json: text, rationale, answer, choice, choice_index, fallback (the answer matched no choice exactly
and the closest one was taken), view, n_latents.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

VIEWS = ("coconut", "cot", "nocot", "dummy")


def main(argv=None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ap = argparse.ArgumentParser(prog="mmcoconut-ask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export dir or DeepSpeed checkpoint")
    ap.add_argument("--image", required=True, help="image file")
    ap.add_argument("--question", required=True)
    ap.add_argument("--choices", default=None, help="'|'-separated answer choices, e.g. 'cat|dog|horse|cow'")
    ap.add_argument("--view", default="coconut", choices=VIEWS,
                    help="coconut: latent thoughts (default); cot: written steps; nocot: answer only; dummy: "
                         "latents replaced (ablation)")
    ap.add_argument("--n-latents", type=int, default=None, help="latent thoughts (default: the model's last stage)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--show-steps", action="store_true", help="also print the generated reasoning")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.image):
        print(f"error: --image {args.image}: no such file", file=sys.stderr)
        return 2
    choices = [c.strip() for c in args.choices.split("|")] if args.choices else None
    import torch

    from mmcoconut.config import ConfigError
    from mmcoconut.export.hf_export import load_hf

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_hf(args.model, device=device)
        res = model.answer(args.image, args.question, choices=choices, view=args.view, n_latents=args.n_latents,
                           max_new_tokens=args.max_new_tokens)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
        return 0
    if args.show_steps:
        if res["n_latents"]:
            print(f"[{res['n_latents']} latent thought(s)]")
        print(res["rationale"] or "(no written steps)")
    if choices:
        note = " (closest choice: the answer matched none exactly)" if res["fallback"] else ""
        print(f"{res['choice_index']}: {res['choice']}{note}")
    else:
        print(res["answer"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
