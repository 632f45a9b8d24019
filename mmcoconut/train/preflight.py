"""Pre-flight: everything checkable from the config, before any model is built or process group exists.

`python -m mmcoconut.train` calls check_config() and, once the engine's settings are resolved, check() on every rank; a
problem is one ConfigError naming the config key, printed as one `error: ...` line with exit code 2. (Checks of
the config alone, ranges and cross-field rules, ran in config.validate() when it was loaded.) Checks: a raw `.json`
given as shards (with the make_shards command to run), shard specs
that exist and have sample counts (train and val), the batch arithmetic per rank and per epoch, shards vs
ranks x workers, and the curriculum's last stage vs the longest step list (exact, from steps.json when
tools/make_shards.py wrote it; skipped otherwise).
"""
from __future__ import annotations

import json
import os

from mmcoconut.config import ConfigError


def check_config(cfg) -> dict:
    """The run config alone (before the ds_config is read). Raises ConfigError (one line) for the first
    problem; returns what check_batches needs: {"urls": train shard list, "samples": samples per epoch}."""
    _json_specs(cfg)
    urls = _expand(cfg.data.train_shards, "data.train_shards")
    samples = cfg.data.samples_per_epoch or sum(_sizes(urls, "data.train_shards"))
    if cfg.data.val_shards:
        val_urls = _expand(cfg.data.val_shards, "data.val_shards")
        if sum(_sizes(val_urls, "data.val_shards", count_missing=True)) == 0:
            raise ConfigError(f"data.val_shards={cfg.data.val_shards}: the shards hold no samples")
    _latent_stages(cfg, urls)
    return {"urls": urls, "samples": samples}


def check(cfg, engine_spec, data: dict | None = None) -> None:
    """Everything: check_config (unless its result `data` is given) and the batch arithmetic of the resolved
    engine settings (engines/base.py EngineSpec: micro-batch, accumulation, world). Raises ConfigError (one line)."""
    data = data or check_config(cfg)
    _batches(cfg, engine_spec, data["samples"], len(data["urls"]))


# ---------------------------------------------------------------- shard specs
def _json_specs(cfg) -> None:
    """Raw json (e.g. the seed config's train_path/val_path) is not shards: say which command makes them."""
    todo = []
    for key, split in (("data.train_shards", "train"), ("data.val_shards", "val")):
        spec = getattr(cfg.data, key.split(".")[1])
        for part in (spec or "").split("::"):
            if part.endswith(".json"):
                stem = os.path.splitext(os.path.basename(part))[0] or split
                out = f"shards/{stem}"
                todo.append(f"{key}={part} is a json file, not WebDataset shards; shard it first: python "
                            f"tools/make_shards.py --json {part} --split {split} --out {out}, then use "
                            f"--{key}={out}/{split}")
    if todo:
        raise ConfigError("; and ".join(todo))


def _expand(spec: str, key: str) -> list[str]:
    from mmcoconut.data.shardlist import expand_shards

    if not spec:
        raise ConfigError(f"{key} is empty: give a shard dir, dir/<split>, a brace pattern or a '::' list "
                          "(write shards with tools/make_shards.py)")
    try:
        return expand_shards(spec)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _sizes(urls: list[str], key: str, count_missing: bool = False) -> list[int]:
    import tarfile

    from mmcoconut.data.shardlist import shard_sizes

    try:
        return shard_sizes(urls, count_missing=count_missing)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    except (OSError, ValueError, tarfile.TarError) as e:  # unreadable sizes.json, corrupt tar while counting
        raise ConfigError(f"{key}: cannot count samples: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- batch arithmetic
def _batches(cfg, engine_spec, samples: int, n_shards: int) -> None:
    from mmcoconut.data.loader import batches_per_rank, check_worker_shards

    micro, acc, world = engine_spec.micro_batch_size, engine_spec.accumulation, engine_spec.world
    spec = cfg.data.train_shards
    try:
        n_batches = batches_per_rank(spec, samples, world, micro)
        check_worker_shards(spec, n_shards, world, cfg.data.num_workers, cfg.data.resampled)
    except ValueError as e:
        raise ConfigError(f"data.train_shards: {e}") from None
    if n_batches < acc:
        raise ConfigError(
            f"data.train_shards: {samples} samples per epoch give {n_batches} micro-batches of {micro} per rank "
            f"(world {world}) < gradient_accumulation_steps {acc}: not one optimizer step per epoch; use more data "
            f"or a smaller global batch (now {engine_spec.global_batch_size})")


# ---------------------------------------------------------------- curriculum vs data
def longest_steps(urls: list[str]):
    """Longest `steps` list over the shards from steps.json next to them (written by tools/make_shards.py:
    {shard basename: longest step list}); None when any shard has no entry (then it is not known cheaply)."""
    cache: dict[str, dict] = {}
    best = 0
    for u in urls:
        path = os.path.join(os.path.dirname(u), "steps.json")
        if path not in cache:
            try:
                with open(path) as f:
                    cache[path] = json.load(f)
            except (OSError, ValueError):
                cache[path] = {}
        n = cache[path].get(os.path.basename(u)) if isinstance(cache[path], dict) else None
        if not isinstance(n, int):
            return None
        best = max(best, n)
    return best


def _latent_stages(cfg, urls: list[str]) -> None:
    from mmcoconut.data.curriculum import stage_for_epoch

    cur = cfg.curriculum
    last = max(stage_for_epoch(cur, e) for e in range(cfg.train.num_epochs))
    if last == 0:
        return
    longest = longest_steps(urls)
    if longest is not None and last > longest:
        raise ConfigError(
            f"curriculum: this run reaches stage {last} (curriculum.max_latent_stage={cur.max_latent_stage}, "
            f"train.num_epochs={cfg.train.num_epochs}) but the longest step list in data.train_shards has {longest} "
            f"step(s) (steps.json): stages above {longest} replace no further step and only add latents; set "
            f"--curriculum.max_latent_stage={longest} or train fewer epochs")
