"""The training loop: curriculum epochs of DeepSpeed steps, logging, validation, checkpoints. Read top to bottom.

Debug knobs (environment, for tests; not part of the run config):
  MMCOCONUT_STOP_AFTER_STEPS=N        stop (like a kill) once N optimizer steps are done, after any save at N
  MMCOCONUT_DEBUG_OVERFLOW_STEPS=3,4  backward(loss * inf) during those optimizer steps: an fp16 overflow that
                                      DeepSpeed's loss scaler must skip (the logged loss stays finite)
  MMCOCONUT_DEBUG_NAN_BATCHES=5       the loss of those micro-batches (1-based, counted per process) becomes NaN
"""
from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.curriculum import stage_for_epoch
from . import checkpoint as ckpt
from .engine import hf_zero3_context, initialize, loss_scale, reset_optimizer_state
from .schedule import make_scheduler_factory
from .tracking import Tracker


def _env_int_list(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


def _to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train(cfg, ds: dict, plan, rank: int, world: int) -> dict:
    """Build everything, optionally resume, train cfg.train.num_epochs epochs. Returns the final TrainState."""
    from mmcoconut.data.loader import StreamingLoader
    from mmcoconut.model import build_image_processor, build_model, build_tokenizer

    t = cfg.train
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    hf_ds = hf_zero3_context(ds)  # noqa: F841  (ZeRO-3: must be alive while the model is built)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    if cfg.model.init_from and plan is None:  # seed: load_model_path (a resumed run has its checkpoint's weights)
        from mmcoconut.model.init_from import load_init_weights
        load_init_weights(model, cfg.model.init_from, rank)
    processor = build_image_processor(cfg.model)

    micro, acc = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    loader = StreamingLoader(cfg.data.train_shards, tokenizer, processor, cfg, rank=rank, world_size=world,
                             micro_batch_size=micro, n_image_tokens=model.n_image_tokens, seed=t.seed)
    # whole optimizer steps per epoch; spare micro-batches make up for skipped non-finite ones
    steps_per_epoch = len(loader) // acc
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} micro-batches per rank per epoch < gradient_accumulation_steps {acc}: "
                         "not one optimizer step; use more data or a smaller global batch")
    engine = initialize(model, ds, make_scheduler_factory(t, steps_per_epoch * t.num_epochs))
    state, rng = ckpt.TrainState(), None
    if plan is not None:
        rng = ckpt.load(engine, cfg, plan, state, loader, world, rank)
    tracker = Tracker(cfg, rank)
    try:
        _loop(cfg, engine, loader, state, tracker, steps_per_epoch, tokenizer, processor, rank, world, rng)
    finally:
        tracker.close()
    if cfg.checkpoint.export_final:  # Hugging Face dir from the live engine (every rank gathers, rank 0 writes)
        from mmcoconut.model.export import export_engine
        export_engine(engine, cfg, state, tokenizer, processor, rank)
    return state.state_dict()


def _loop(cfg, engine, loader, state, tracker, steps_per_epoch, tokenizer, processor, rank, world, rng):
    t = cfg.train
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    fp16 = engine.fp16_enabled()
    stop_after = int(os.environ.get("MMCOCONUT_STOP_AFTER_STEPS", "0") or 0)
    overflow_steps = _env_int_list("MMCOCONUT_DEBUG_OVERFLOW_STEPS")
    nan_batches, n_batches_seen = _env_int_list("MMCOCONUT_DEBUG_NAN_BATCHES"), 0
    if rank == 0:
        print(f"train: world {world}, micro {engine.train_micro_batch_size_per_gpu()}, accumulation "
              f"{engine.gradient_accumulation_steps()}, global batch {engine.train_batch_size()}, "
              f"{steps_per_epoch} steps/epoch, ZeRO-{engine.zero_optimization_stage()}, "
              f"{'fp16' if fp16 else 'bf16' if engine.bfloat16_enabled() else 'fp32'}, run dir {cfg.run_dir}"
              + (f", resumed at step {state.step} (epoch {state.epoch})" if state.step else ""), flush=True)

    engine.train()  # from_pretrained returns eval-mode modules: dropout must be on from the first step
    if rng is not None and state.epoch_done:  # resumed at an epoch end: RNG as it was when saved
        ckpt.set_rng_state(rng)
        rng = None
    first_epoch = state.epoch + 1 if state.epoch_done else state.epoch
    nonfinite_run = 0
    for epoch in range(first_epoch, t.num_epochs):
        # ---- curriculum: stage of this epoch; Coconut resets the optimizer when the stage changes
        stage = stage_for_epoch(cfg.curriculum, epoch)
        if state.epoch_done or epoch != state.epoch:  # a new epoch (not the continuation of a resumed one)
            state.step_in_epoch, state.batch_in_epoch, state.epoch_done = 0, 0, False
        loader.set_epoch(epoch)
        loader.set_stage(stage)
        if stage != state.stage:
            tracker.log("stage", step=state.step, epoch=epoch, stage=stage)
            if cfg.curriculum.reset_optimizer:
                reset_optimizer_state(engine)
        state.epoch, state.stage = epoch, stage

        # ---- micro-batches; DeepSpeed accumulates and steps the optimizer on the boundary
        win = {"loss": 0.0, "n": 0, "samples": 0.0, "tokens": 0.0, "t0": time.perf_counter()}
        batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, disable=rank != 0,
                   desc=f"epoch {epoch} stage {stage}", dynamic_ncols=True)
        while state.step_in_epoch < steps_per_epoch:
            batch = next(batches, None)
            if rng is not None:  # resumed mid-epoch: the loader's first next() draws a seed from torch's RNG,
                ckpt.set_rng_state(rng)  # which the saved RNG state already includes
                rng = None
            if batch is None:  # only after skipped non-finite batches; the partial accumulation carries over
                break
            batch = _to_device(batch, device, dtype)
            state.batch_in_epoch += 1
            loss = engine(**batch).loss
            n_batches_seen += 1
            if n_batches_seen in nan_batches:
                loss = loss * float("nan")
            # one collective per micro-batch: mean loss over ranks (all agree on NaN/inf), samples, tokens
            loss_sum, samples, tokens = _all_sum(
                [loss.detach().float().item(), batch["input_ids"].shape[0], batch["attention_mask"].sum().item()],
                device)
            mean_loss = loss_sum / world
            if not math.isfinite(mean_loss):  # skip the update: no backward, no step (on every rank)
                nonfinite_run += 1
                state.nonfinite += 1
                tracker.log("nonfinite", step=state.step, epoch=epoch, stage=stage, loss=mean_loss,
                            in_a_row=nonfinite_run, total=state.nonfinite)
                if nonfinite_run >= t.max_nonfinite_steps:
                    raise RuntimeError(f"{nonfinite_run} non-finite losses in a row (train.max_nonfinite_steps="
                                       f"{t.max_nonfinite_steps}) at step {state.step}, epoch {epoch}: stopping. "
                                       "Lower train.lr, check the data, or use fp32/bf16.")
                continue
            nonfinite_run = 0
            engine.backward(loss * float("inf") if engine.global_steps + 1 in overflow_steps else loss)
            engine.step()
            win["loss"] += mean_loss
            win["n"] += 1
            win["samples"] += samples
            win["tokens"] += tokens
            state.samples += int(samples)
            if engine.global_steps == state.step:
                continue  # not an accumulation boundary yet
            state.step, state.step_in_epoch = engine.global_steps, state.step_in_epoch + 1
            bar.update(1)

            # ---- optimizer step done: log, checkpoint, maybe stop
            if state.step % t.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                dt = max(time.perf_counter() - win["t0"], 1e-9)
                gn = engine.get_global_grad_norm()
                rec = dict(step=state.step, epoch=epoch, stage=stage, loss=win["loss"] / max(win["n"], 1),
                           lr=engine.get_lr()[0], grad_norm=None if gn is None else float(gn),
                           loss_scale=loss_scale(engine), skipped_steps=engine.skipped_steps,
                           samples_per_s=win["samples"] / dt, tokens_per_s=win["tokens"] / dt)
                tracker.log("train", **rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                win = {"loss": 0.0, "n": 0, "samples": 0.0, "tokens": 0.0, "t0": time.perf_counter()}
            every = cfg.checkpoint.save_every_steps
            if every and state.step % every == 0 and state.step_in_epoch < steps_per_epoch:
                ckpt.save(engine, cfg, state, loader, f"step{state.step:08d}")
            if stop_after and state.step >= stop_after:
                bar.close()
                if rank == 0:
                    print(f"train: stopping after step {state.step} (MMCOCONUT_STOP_AFTER_STEPS)", flush=True)
                return
        bar.close()

        # ---- epoch end: checkpoint (never after a non-finite loss), then validation
        state.epoch_done = True
        if nonfinite_run == 0:
            ckpt.save(engine, cfg, state, loader, f"epoch{epoch + 1:03d}")
        if cfg.data.val_shards and cfg.eval.val_every_epoch:
            validate(cfg, engine, tokenizer, processor, state, tracker, rank, world)


def validate(cfg, engine, tokenizer, processor, state, tracker, rank, world) -> dict:
    """RNG-neutral validation: training after it is the same as without it (exact resume from epoch ends)."""
    rng = ckpt.rng_state()
    try:
        return _validate(cfg, engine, tokenizer, processor, state, tracker, rank, world)
    finally:
        ckpt.set_rng_state(rng)


@torch.no_grad()
def _validate(cfg, engine, tokenizer, processor, state, tracker, rank, world) -> dict:
    """Val loss (token-weighted, valid rows only) on up to eval.val_samples, then MC/DA accuracy by generation
    in the view matching training (ZeRO-1/2 only: ZeRO-3 would need equal forward counts on every rank)."""
    from mmcoconut.data.loader import EvalLoader

    model, c = engine.module, cfg.curriculum
    view = "coconut" if c.coconut and not c.no_cot else "nocot" if c.no_cot else "cot"
    device, dtype = engine.device, next(model.parameters()).dtype
    loader = EvalLoader(cfg.data.val_shards, tokenizer, processor, cfg, view="train", n_latents=None,
                        batch_size=engine.train_micro_batch_size_per_gpu(), rank=rank, world_size=world,
                        n_image_tokens=model.n_image_tokens, max_samples=cfg.eval.val_samples, stage=state.stage,
                        with_labels=True)
    engine.eval()
    nll, ntok = 0.0, 0.0
    for batch in loader:
        valid = torch.tensor(batch["valid"], device=device)
        batch = _to_device({k: v for k, v in batch.items() if k not in ("meta", "valid")}, device, dtype)
        logits = engine(**{**batch, "labels": None}).logits.float()
        labels = batch["labels"][:, 1:].masked_fill(~valid[:, None], -100)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        nll, ntok = nll + ce.item(), ntok + (labels != -100).sum().item()
    nll, ntok = _all_sum([nll, ntok], device)
    rec = dict(step=state.step, epoch=state.epoch, stage=state.stage, view=view,
               val_loss=nll / ntok if ntok else None, mc=None, da=None, n=None)
    if engine.zero_optimization_stage() < 3:
        from mmcoconut.eval.evaluate import default_n_latents, evaluate

        res = evaluate(model, tokenizer, processor, cfg, cfg.data.val_shards, views=[view], out_dir=None,
                       rank=rank, world_size=world, n_latents=default_n_latents(cfg, state.stage),
                       max_samples=cfg.eval.val_samples, verbose=False)[view]
        rec.update(mc=res["mc"], da=res["da"], n=res["n"])
    engine.train()
    tracker.log("val", **rec)
    if rank == 0:
        print(f"val: epoch {state.epoch} stage {state.stage} loss {rec['val_loss']} mc {rec['mc']}", flush=True)
    return rec
