"""mmcoconut-train / python -m mmcoconut.train CONFIG [--key=value ...] [--deepspeed DS_CONFIG]

`--help` lists every config key (type, default, doc) by section. Also accepted: `--deepspeed --deepspeed_config
PATH` (DeepSpeed's add_config_arguments spelling) and the launcher's `--local_rank=N`. Every other `--key=value` is
a run-config override (mmcoconut.config). Several processes: ./launch.sh, or `deepspeed --num_gpus N --module
mmcoconut.train ...` (train.engine=deepspeed) / `torchrun --nproc_per_node N -m mmcoconut.train ...`
(train.engine=fsdp2); without a launcher the run is a single process (the environment a process group needs is set
up here, so DeepSpeed never tries MPI discovery). Test-only fault injection: MMCOCONUT_TEST_FAULTS (read once here,
mmcoconut/train/faults.py). Under launch.sh's torchrun each rank leaves its exit code in MMCOCONUT_EXIT_CODE_DIR
(torchrun itself reports any failing rank as 1).
"""
from __future__ import annotations

import os
import socket
import sys

from mmcoconut.config import ConfigError, load_config

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


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
        if a.startswith("-") and not a.startswith("--"):
            raise ConfigError(f"unknown option {a!r} (see --help)")
        if config is None and not a.startswith("--"):
            config = a
        else:
            rest.append(a)
        i += 1
    if config is None:
        raise ConfigError("usage: mmcoconut-train CONFIG [--key=value ...] [--deepspeed DS_CONFIG] (--help lists "
                          "every key)")
    return config, ds_path, rest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(argv: list[str]) -> bool:
    """No launcher (no RANK/WORLD_SIZE/LOCAL_RANK, no --local_rank): set up a one-process group's environment so
    deepspeed.init_distributed() uses it instead of MPI discovery. Returns whether it did."""
    if any(k in os.environ for k in LAUNCHER_ENV) or any(a.startswith("--local_rank") for a in argv):
        return False
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return True


def main(argv=None) -> int:
    from mmcoconut.train.signals import record_exit_code

    rc = _main(sys.argv[1:] if argv is None else argv)
    record_exit_code(rc)  # launch.sh under torchrun: the real exit code (torchrun turns any failure into 1)
    return rc


def _main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from mmcoconut.config_help import help_text
        prog = "mmcoconut-train" if os.path.basename(sys.argv[0]) == "mmcoconut-train" else "python -m mmcoconut.train"
        print(help_text(prog), end="")
        return 0
    from mmcoconut.train.signals import stop_request

    stop = stop_request()  # first: a stop signal during startup is honoured at the first step boundary (signals.py)
    single = single_process_env(argv)
    if not single:  # under a launcher: its death stops this rank like a signal (launcher_watch.py)
        from mmcoconut.train.launcher_watch import LauncherWatch
        LauncherWatch(stop).start()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config, ds_path, overrides = parse_args(argv)
        cfg = load_config(config, overrides)
        if ds_path:
            cfg.train.deepspeed_config = ds_path
        explicit_ds = bool(cfg.train.deepspeed_config)
        seed_batch = "batch_size_training" in getattr(cfg, "seed_keys", ())
        if seed_batch and not explicit_ds and cfg.train.gradient_accumulation_steps is None:
            cfg.train.gradient_accumulation_steps = 1  # the seed's global batch: batch_size_training x ranks
        # everything that can be wrong with the configs fails here, on every rank, before any collective
        from mmcoconut.seed_config import batch_note
        from mmcoconut.train.checkpoint.resume import find_resume
        from mmcoconut.train.engines import resolve_spec
        from mmcoconut.train.engines.ds_config import default_ds_config, enable_universal_load
        from mmcoconut.train.faults import Faults
        from mmcoconut.train.preflight import check, check_config

        faults = Faults.from_env()
        data = check_config(cfg, world)  # pre-flight: data, hyper-parameters, curriculum; nothing is built before it
        spec = resolve_spec(cfg, world)
        resume = find_resume(cfg, world, spec.zero_stage, spec.micro_batch_size)
        if resume is not None and resume.universal:
            enable_universal_load(spec.ds_config)
        notes = getattr(cfg, "notes", []) + check(cfg, spec, data)  # pre-flight: batch arithmetic of the engine
        if seed_batch and spec.name == "deepspeed":
            notes.append(batch_note(spec.ds_config, world, cfg.train.deepspeed_config or default_ds_config(world).name,
                                    explicit_ds))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for note in notes if rank == 0 else ():
        print(f"note: {note}", flush=True)

    from mmcoconut.train.engines import init_distributed
    from mmcoconut.train.trainer import run

    if single:
        print("train: no launcher, running as a single process (./launch.sh for several)", flush=True)
    init_distributed(spec)
    if rank == 0 and resume is not None:
        print(f"resume: {cfg.run_dir}/{resume.tag}{' (universal)' if resume.universal else ''}", flush=True)
    return run(cfg, spec, resume, faults)  # exit codes: docs/training.md, "Preemption and exit codes"


if __name__ == "__main__":
    sys.exit(main())
