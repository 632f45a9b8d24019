"""python -m mmcoconut.train CONFIG [--key=value ...] --deepspeed ds_configs/X.json

Also accepted: `--deepspeed --deepspeed_config PATH` (DeepSpeed's add_config_arguments spelling) and the
launcher's `--local_rank=N`. Every other `--key=value` is a run-config override (mmcoconut.config).
Launch on several processes with `deepspeed --num_gpus N -m mmcoconut.train ...` or ./launch.sh.
"""
from __future__ import annotations

import os
import sys

from mmcoconut.config import ConfigError, load_config


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """-> (config, ds_config path or None, overrides)."""
    config, ds_path, rest, i = None, None, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank"):
            i += 1 if "=" in a else 2
            continue
        if a in ("--deepspeed", "--deepspeed_config") or a.startswith(("--deepspeed=", "--deepspeed_config=")):
            key, eq, val = a.partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            elif not eq and key == "--deepspeed_config":
                raise ConfigError("--deepspeed_config needs a path")
            ds_path = val or ds_path
            i += 1
            continue
        if config is None and not a.startswith("--"):
            config = a
        else:
            rest.append(a)
        i += 1
    if config is None:
        raise ConfigError("usage: python -m mmcoconut.train CONFIG [--key=value ...] --deepspeed ds_configs/X.json")
    return config, ds_path, rest


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .signals import stop_request

    stop_request()  # first: a stop signal during startup is honoured at the first step boundary (signals.py)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config, ds_path, overrides = parse_args(argv)
        cfg = load_config(config, overrides)
        if ds_path:
            cfg.train.deepspeed_config = ds_path
        # everything that can be wrong with the configs fails here, on every rank, before any collective
        from .checkpoint import plan_resume
        from .engine import resolve_ds_config
        from .preflight import check, check_config

        data = check_config(cfg)  # pre-flight: data, hyper-parameters, curriculum; nothing is built before it
        ds = resolve_ds_config(cfg, world=world)
        plan = plan_resume(cfg, world, int(ds.get("zero_optimization", {}).get("stage", 0)),
                           ds["train_micro_batch_size_per_gpu"])
        if plan is not None and plan.universal:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        check(cfg, ds, world, data)  # pre-flight: batch arithmetic of the resolved ds_config
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    from .engine import init_distributed
    from .loop import run

    init_distributed()
    if rank == 0 and plan is not None:
        print(f"resume: {cfg.run_dir}/{plan.tag}{' (universal)' if plan.universal else ''}", flush=True)
    return run(cfg, ds, plan, rank, world)  # exit codes: README, "Preemption and exit codes"


if __name__ == "__main__":
    sys.exit(main())
