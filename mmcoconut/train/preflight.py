"""Pre-flight: everything checkable from the config, before any model is built or process group exists.

`python -m mmcoconut.train` calls check_config() and, once the engine's settings are resolved, check() on every rank; a
problem is one ConfigError naming the config key, printed as one `error: ...` line with exit code 2. (Checks of
the config alone, ranges and cross-field rules, ran in config.validate() when it was loaded.) Checks and fixes:
local model paths made absolute (a missing one, model.init_from included, is an error: model_paths.py); a raw
`.json` list given as shards (the seed's train_path) sharded once into a cache next to it (data/json_cache.py);
shard specs that exist and have sample counts (train and val); the first samples of the training shards (all bad:
an error naming the shard and the reason; their prompt format -> data.choices_in_question: data/probe.py); shards
vs ranks x workers (data.num_workers lowered, with a note, when there are too few shards); the batch arithmetic per
rank and per epoch; the curriculum's last stage vs the longest step list (exact, from the steps.json that
mmcoconut-shard writes; skipped otherwise).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmcoconut.config import ConfigError


def check_config(cfg, world: int = 1) -> dict:
    """The run config alone (before the ds_config is read); may fix cfg (see the module docstring). Raises
    ConfigError (one line) for the first problem; returns what check() needs: {"urls": train shard list,
    "samples": samples per epoch, "notes": lines for rank 0 to print}."""
    from mmcoconut.model_paths import resolve_model_paths

    notes: list[str] = []
    resolve_model_paths(cfg.model, [Path.cwd()])
    _shard_json_specs(cfg)
    urls = _expand(cfg.data.train_shards, "data.train_shards")
    samples = cfg.data.samples_per_epoch or sum(_sizes(urls, "data.train_shards"))
    if cfg.data.val_shards:
        val_urls = _expand(cfg.data.val_shards, "data.val_shards")
        if sum(_sizes(val_urls, "data.val_shards", count_missing=True)) == 0:
            raise ConfigError(f"data.val_shards={cfg.data.val_shards}: the shards hold no samples")
    _latent_stages(cfg, urls)
    _probe(cfg, urls)
    _fit_workers(cfg, len(urls), world, notes)
    return {"urls": urls, "samples": samples, "notes": notes}


def check(cfg, engine_spec, data: dict | None = None) -> list[str]:
    """Everything: check_config (unless its result `data` is given) and the batch arithmetic of the resolved
    engine settings (engines/base.py EngineSpec: micro-batch, accumulation, world). Raises ConfigError (one line);
    returns check_config's notes."""
    data = data or check_config(cfg, engine_spec.world)
    _batches(cfg, engine_spec, data["samples"], len(data["urls"]))
    return data["notes"]


# ---------------------------------------------------------------- shard specs
def _shard_json_specs(cfg) -> None:
    """A raw json list (the seed config's train_path/val_path) is sharded once into a cache next to it."""
    from mmcoconut.data import remote
    from mmcoconut.data.json_cache import shards_for_json

    for key, split in (("data.train_shards", "train"), ("data.val_shards", "val")):
        spec = getattr(cfg.data, key.split(".")[1])
        parts = (spec or "").split("::")
        if not any(p.endswith(".json") and remote.kind(p) == "local" for p in parts):
            continue
        try:
            parts = [shards_for_json(p, split, key, announce=lambda m: print(m, flush=True))
                     if p.endswith(".json") and remote.kind(p) == "local" else p for p in parts]
        except (ValueError, OSError) as e:
            raise ConfigError(str(e) if isinstance(e, ValueError) else
                              f"{key}={spec}: cannot shard the json into a cache next to it ({e}); shard it by "
                              f"hand with mmcoconut-shard --json FILE --split {split} --out DIR") from None
        setattr(cfg.data, key.split(".")[1], "::".join(parts))


def _probe(cfg, urls: list[str]) -> None:
    """The first samples of the training shards: all bad is an error now (not minutes later); the prompt format
    they share becomes data.choices_in_question unless the config sets it."""
    from mmcoconut.data.probe import probe_shards

    p = probe_shards(urls, cfg.data, need_steps=not cfg.curriculum.no_cot)
    if p.all_bad:
        url, key, why = p.bad[0]
        raise ConfigError(f"data.train_shards: every sample read ({p.read}, from the first {len(p.shards)} "
                          f"shard(s)) fails: {url}: sample {key!r}: {why}; fix the shards (mmcoconut-shard writes "
                          "valid ones)" + (" or train on answers only (curriculum.no_cot=true)"
                                           if why.startswith("no_steps") else ""))
    if cfg.data.choices_in_question is None:
        if p.listed and p.unlisted:
            raise ConfigError(f"data.train_shards: of the first samples of {', '.join(p.shards)}, {p.listed} list "
                              f"their choices in the question and {p.unlisted} do not; set "
                              "data.choices_in_question=true or false to train (and answer) in one format")
        cfg.data.choices_in_question = p.choices_in_question


def _fit_workers(cfg, n_shards: int, world: int, notes: list[str]) -> None:
    """Without resampling every (rank, worker) reads shards of its own: too few shards for the workers lowers
    data.num_workers (with a note); too few for the ranks is an error (in check())."""
    d = cfg.data
    workers = max(1, d.num_workers)
    if d.resampled or n_shards >= world * workers or n_shards < world:
        return
    fit = n_shards // world
    notes.append(f"data.num_workers {d.num_workers} -> {fit}: {n_shards} shard(s) for {world} rank(s) x {workers} "
                 "workers, and every worker reads shards of its own (more, smaller shards: mmcoconut-shard "
                 "--maxcount; or data.resampled=true)")
    d.num_workers = fit


def _expand(spec: str, key: str) -> list[str]:
    from mmcoconut.data.shardlist import expand_shards

    if not spec:
        raise ConfigError(f"{key} is empty: give a shard dir, dir/<split>, a brace pattern or a '::' list "
                          "(write shards with mmcoconut-shard)")
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
    """Longest `steps` list over the shards from steps.json next to them (written by mmcoconut-shard:
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
