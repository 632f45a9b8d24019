"""The training loop: curriculum epochs of DeepSpeed steps, logging, validation, checkpoints. Read top to bottom.

An optimizer step is always `gradient_accumulation_steps` whole micro-batches. A window with a NaN/inf loss on
any rank is skipped as a whole through DeepSpeed's skipped-step path (nonfinite.py), so every epoch has the same
steps and batches and no partial accumulation crosses an epoch, a stage change or a checkpoint: resume is exact.
Per step: one collective and at most one host read, a step late (stepsync.py). Stop signals (signals.py) and
time-based saves are agreed through that collective; the step's fate is decided on the device.

Debug knobs (environment, for tests; not part of the run config):
  MMCOCONUT_STOP_AFTER_STEPS=N        stop (like a kill) once N optimizer steps are done, after any save at N
  MMCOCONUT_DEBUG_OVERFLOW_STEPS=3,4  backward(loss * inf) during those optimizer steps: an fp16 overflow that
                                      DeepSpeed's loss scaler must skip (the logged loss stays finite)
  MMCOCONUT_DEBUG_NAN_BATCHES=5,21    the loss of those micro-batches becomes NaN (1-based, counted per rank from
                                      the start of the run, so a resumed run meets the same ones)
  MMCOCONUT_DEBUG_NAN_RANKS=0         ... on these ranks only (default: all)
  MMCOCONUT_DEBUG_PAUSE_AT_STEP=N     after step N each rank touches <file>.reached.<rank> and waits while <file>
  MMCOCONUT_DEBUG_PAUSE_FILE=<file>   exists (tests act on a run at a known step)
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmcoconut.config import ConfigError

from ..data.curriculum import stage_for_epoch
from . import checkpoint as ckpt
from .checkpoint import TrainError
from .engine import hf_zero3_context, initialize, loss_scale, reset_optimizer_state, zero3_param_editor
from .nonfinite import HOST, finish_window, prepare_ds_config, skip_mode
from .schedule import make_scheduler_factory
from .signals import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_STOPPED, Stopped, stop_request
from .steplog import StepLog
from .stepsync import StepSync
from .tracking import Tracker


def _env_ints(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


def _to_device(batch: dict, device, dtype) -> dict:
    """Tensors (pinned by the loader on CUDA) and objects with a `.to` (e.g. a precomputed pass plan) move with
    non_blocking copies; floating tensors then take the model dtype on the device; everything else passes."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        elif callable(getattr(v, "to", None)) and not isinstance(v, (str, bytes)):
            v = v.to(device, non_blocking=True)
        out[k] = v
    return out


def _all_sum(values: list, device) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def run(cfg, ds: dict, plan, rank: int, world: int) -> int:
    """`python -m mmcoconut.train` after the process group exists: train, and turn the outcome into the exit code
    (README, "Preemption and exit codes")."""
    stop = stop_request()  # before anything slow: a signal during the model build is honoured at step 1
    try:
        train(cfg, ds, plan, rank, world)
        return EXIT_OK
    except Stopped as e:
        if rank == 0:
            print(f"train: {e}", flush=True)
        return EXIT_STOPPED
    except ConfigError as e:  # the run dir is locked, ... (raised on every rank alike)
        if rank == 0:
            print(f"error: {e}", flush=True)
        return EXIT_CONFIG
    except TrainError as e:
        if rank == 0 or not e.agreed:
            print(f"error: {e}", flush=True)
        return EXIT_ERROR
    finally:
        stop.uninstall()


def _lock_run_dir(cfg, rank: int, world: int):
    """Rank 0 takes the run-dir lock and repairs the run dir under it (partial checkpoints, torn index); every
    rank learns the outcome from one broadcast, so a refused run stops everywhere before any model is built."""
    from .index import recover
    from .lock import RunLock

    lock, err = None, None
    if rank == 0:
        try:
            lock = RunLock(cfg.run_dir).acquire()
            recover(cfg.run_dir)
        except ConfigError as e:
            err = str(e)
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise ConfigError(err)
    return lock


def train(cfg, ds: dict, plan, rank: int, world: int) -> dict:
    """Build everything, optionally resume, train cfg.train.num_epochs epochs. Returns the final TrainState."""
    lock = _lock_run_dir(cfg, rank, world)
    try:
        return _train(cfg, ds, plan, rank, world)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, ds, plan, rank, world) -> dict:
    from mmcoconut.data.loader import StreamingLoader
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer

    t = cfg.train
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    hf_ds = hf_zero3_context(ds)  # noqa: F841  (ZeRO-3: must be alive while the model is built)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, edit_params=zero3_param_editor(ds))
    if cfg.model.init_from and plan is None:  # seed: load_model_path (a resumed run has its checkpoint's weights)
        from mmcoconut.export.init_from import load_init_weights
        load_init_weights(model, cfg.model.init_from, rank)
    processor = build_image_processor(cfg.model)

    micro, acc = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    loader = StreamingLoader(cfg.data.train_shards, tokenizer, processor, cfg, rank=rank, world_size=world,
                             micro_batch_size=micro, n_image_tokens=model.n_image_tokens, seed=t.seed)
    steps_per_epoch = len(loader) // acc  # whole optimizer steps; the rest of the epoch's batches is not used
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} micro-batches per rank per epoch < gradient_accumulation_steps {acc}: "
                         "not one optimizer step; use more data or a smaller global batch")
    notes = prepare_ds_config(ds)
    engine = initialize(model, ds, make_scheduler_factory(
        t, steps_per_epoch * t.num_epochs, lambda step: stage_for_epoch(cfg.curriculum, step // steps_per_epoch)))
    state, rng = ckpt.TrainState(), None
    if plan is not None:
        rng = ckpt.load(engine, cfg, plan, state, loader, world, rank)
        notes += plan.notes
    tracker = Tracker(cfg, rank, resumed=plan is not None)
    if tracker.config_moved is not None:
        notes.append(f"{cfg.run_dir}/config.yaml changed; the previous one is {tracker.config_moved}")
        tracker.log("config_change", step=state.step, changes={k: list(v) for k, v in tracker.config_changes.items()},
                    previous=str(tracker.config_moved))
    for note in notes if rank == 0 else ():
        print(f"note: {note}", flush=True)
    try:
        _loop(cfg, engine, loader, state, tracker, steps_per_epoch, tokenizer, processor, rank, world, rng)
    finally:
        tracker.close()
    if cfg.checkpoint.export_final:  # Hugging Face dir from the live engine (every rank gathers, rank 0 writes)
        from mmcoconut.export.hf_export import export_engine
        export_engine(engine, cfg, state, tokenizer, processor, rank)
    return state.state_dict()


def _loop(cfg, engine, loader, state, tracker, steps_per_epoch, tokenizer, processor, rank, world, rng):
    t, stop = cfg.train, stop_request()
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    acc, mode = engine.gradient_accumulation_steps(), skip_mode(engine)
    sync = StepSync(device, world, lag=0 if mode == HOST else 1)
    steplog = StepLog(cfg, state, tracker, steps_per_epoch, world)
    loader.pin_memory = device.type == "cuda"
    stop_after = int(os.environ.get("MMCOCONUT_STOP_AFTER_STEPS", "0") or 0)
    overflow_steps, nan_batches = _env_ints("MMCOCONUT_DEBUG_OVERFLOW_STEPS"), _env_ints("MMCOCONUT_DEBUG_NAN_BATCHES")
    nan_ranks = _env_ints("MMCOCONUT_DEBUG_NAN_RANKS")
    nan_here = not nan_ranks or rank in nan_ranks
    minutes, last_save = cfg.checkpoint.save_every_minutes, time.monotonic()
    if rank == 0:
        print(f"train: world {world}, micro {engine.train_micro_batch_size_per_gpu()}, accumulation {acc}, global "
              f"batch {engine.train_batch_size()}, {steps_per_epoch} steps/epoch, "
              f"ZeRO-{engine.zero_optimization_stage()}, "
              f"{'fp16' if engine.fp16_enabled() else 'bf16' if engine.bfloat16_enabled() else 'fp32'}, run dir "
              f"{cfg.run_dir}" + (f", resumed at step {state.step} (epoch {state.epoch})" if state.step else ""),
              flush=True)

    def save(tag: str) -> None:
        nonlocal last_save
        steplog.take(sync.ready(flush=True))  # the checkpoint's counters include every step so far
        ckpt.save(engine, cfg, state, loader, tag)
        stop.last_checkpoint, last_save = f"{cfg.run_dir}/{tag}", time.monotonic()

    engine.train()  # from_pretrained returns eval-mode modules: dropout must be on from the first step
    if rng is not None and state.epoch_done:  # resumed at an epoch end: RNG as it was when saved
        ckpt.set_rng_state(rng)
        rng = None
    first_epoch = state.epoch + 1 if state.epoch_done else state.epoch
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

        # ---- optimizer steps of `acc` micro-batches; DeepSpeed accumulates and steps on the boundary
        batches = iter(loader)  # len(loader) >= steps_per_epoch * acc: never runs dry
        bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, disable=rank != 0,
                   desc=f"epoch {epoch} stage {stage}", dynamic_ncols=True)
        while state.step_in_epoch < steps_per_epoch:
            sync.begin()
            for i in range(acc):
                batch = next(batches)
                if rng is not None:  # resumed mid-epoch: the loader's first next() draws a seed from torch's RNG,
                    ckpt.set_rng_state(rng)  # which the saved RNG state already includes
                    rng = None
                rows, mask = batch["input_ids"].shape[0], batch["attention_mask"]
                batch = _to_device(batch, device, dtype)
                state.batch_in_epoch += 1
                loss = engine(**batch, return_logits=False).loss  # no [B, T, V] logits (modeling/loss.py)
                if nan_here and state.step * acc + i + 1 in nan_batches:
                    loss = loss * float("nan")
                sync.add(loss, rows, mask)
                if i < acc - 1:
                    engine.backward(loss)
                    engine.step()
                    continue
                # last micro-batch: the step's one collective decides its fate on every rank alike
                due = rank == 0 and minutes > 0 and time.monotonic() - last_save >= 60 * minutes
                if due:
                    last_save = time.monotonic()  # flagged once; the save follows at the next boundaries
                vec = sync.reduce(stop.requested, due, loader.skip_counts)
                # a window with a NaN/inf loss on any rank: poisoned backward, DeepSpeed skips the step
                values = finish_window(engine, mode, sync, vec, loss, engine.global_steps + 1 in overflow_steps)
            state.step, state.step_in_epoch = engine.global_steps, state.step_in_epoch + 1
            sync.push(vec, engine.get_global_grad_norm(), values=values, info=dict(
                step=state.step, epoch=epoch, stage=stage, lr=engine.get_lr()[0], loss_scale=loss_scale(engine),
                skipped_steps=engine.skipped_steps, last=state.step_in_epoch == steps_per_epoch))
            bar.update(1)

            # ---- step boundary: read last step's values (now all, before a save), log, decide, checkpoint
            last = state.step_in_epoch == steps_per_epoch
            every = cfg.checkpoint.save_every_steps
            by_steps = bool(every) and state.step % every == 0
            steplog.take(sync.ready(flush=last or by_steps or state.step == stop_after))
            if steplog.stop or steplog.save_due:
                steplog.take(sync.ready(flush=True))
            if rank == 0 and steplog.last_loss is not None:
                bar.set_postfix(loss=f"{steplog.last_loss:.4f}", lr=f"{steplog.last_lr:.2e}", refresh=False)
            if not last and (by_steps or steplog.save_due or steplog.stop):
                save(f"step{state.step:08d}")
                steplog.save_due = False
            if steplog.stop and not last:
                bar.close()
                raise Stopped(_stopped_message(cfg, state, stop))
            if stop_after and state.step >= stop_after:
                bar.close()
                if rank == 0:
                    print(f"train: stopping after step {state.step} (MMCOCONUT_STOP_AFTER_STEPS)", flush=True)
                return
            _debug_pause(state.step, rank)
        bar.close()

        # ---- epoch end: checkpoint, then validation (skipped when stopping)
        state.epoch_done = True
        save(f"epoch{epoch + 1:03d}")
        steplog.save_due = False
        if steplog.stop and epoch + 1 < t.num_epochs:
            raise Stopped(_stopped_message(cfg, state, stop))
        if steplog.stop:
            if rank == 0:
                print("train: stop requested at the end of the last epoch: training is complete; final "
                      "validation skipped", flush=True)
            return
        if cfg.data.val_shards and cfg.eval.val_every_epoch:
            validate(cfg, engine, tokenizer, processor, state, tracker, rank, world,
                     accuracy=val_accuracy_due(cfg, epoch))


def _stopped_message(cfg, state, stop) -> str:
    why = f"{stop.name} received" if stop.requested else "a stop signal reached another rank"
    return (f"stopped at step {state.step} (epoch {state.epoch}): {why}. Checkpoint {stop.last_checkpoint} is "
            f"saved; run the same command again to resume from it (checkpoint.resume=auto). Exit code "
            f"{EXIT_STOPPED} means: stopped by a signal after saving, resumable.")


def _debug_pause(step: int, rank: int) -> None:
    at, path = os.environ.get("MMCOCONUT_DEBUG_PAUSE_AT_STEP"), os.environ.get("MMCOCONUT_DEBUG_PAUSE_FILE")
    if not (at and path and int(at) == step):
        return
    Path(f"{path}.reached.{rank}").touch()
    while Path(path).exists():
        time.sleep(0.1)


def val_accuracy_due(cfg, epoch: int) -> bool:
    """Whether the validation after `epoch` also generates (eval.val_accuracy: every epoch, at the last epoch of
    each curriculum stage and of the run, or never)."""
    stage = stage_for_epoch(cfg.curriculum, epoch)
    last_of_stage = epoch + 1 == cfg.train.num_epochs or stage_for_epoch(cfg.curriculum, epoch + 1) != stage
    return {"epoch": True, "stage_end": last_of_stage, "never": False}[cfg.eval.val_accuracy]


def validate(cfg, engine, tokenizer, processor, state, tracker, rank, world, accuracy: bool = True) -> dict:
    """RNG-neutral validation: training after it is the same as without it (exact resume from epoch ends)."""
    rng = ckpt.rng_state()
    try:
        return _validate(cfg, engine, tokenizer, processor, state, tracker, rank, world, accuracy)
    finally:
        ckpt.set_rng_state(rng)


@torch.no_grad()
def _validate(cfg, engine, tokenizer, processor, state, tracker, rank, world, accuracy) -> dict:
    """Val loss (token-weighted, valid rows only) on up to eval.val_samples, then (`accuracy`) MC/DA accuracy by
    generation in the view matching training (ZeRO-1/2 only: ZeRO-3 would need equal forward counts per rank).
    Samples the val loader skipped are reported per reason (`skipped_<reason>`, all ranks)."""
    from mmcoconut.data.eval_loader import EvalLoader
    from mmcoconut.data.pipeline import SKIP_REASONS

    model, c = engine.module, cfg.curriculum
    view = "coconut" if c.coconut and not c.no_cot else "nocot" if c.no_cot else "cot"
    device, dtype = engine.device, next(model.parameters()).dtype
    loader = EvalLoader(cfg.data.val_shards, tokenizer, processor, cfg, view="train", n_latents=None,
                        batch_size=engine.train_micro_batch_size_per_gpu(), rank=rank, world_size=world,
                        n_image_tokens=model.n_image_tokens, max_samples=cfg.eval.val_samples, stage=state.stage,
                        with_labels=True)
    engine.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    ntok = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        valid = torch.tensor(batch["valid"]).to(device, non_blocking=True)
        batch = _to_device({k: v for k, v in batch.items() if k not in ("meta", "valid")}, device, dtype)
        # the label-only loss (no [B, T, V] logits); padding rows (valid=False) have no labels (_WithMeta)
        labels = batch["labels"][:, 1:].masked_fill(~valid[:, None], -100)
        n = (labels != -100).sum()
        nll, ntok = nll + engine(**batch, return_logits=False).loss.double() * n, ntok + n
    skips = loader.skips.as_dict()
    nll, ntok, *skipped = _all_sum([nll, ntok] + [skips[r] for r in SKIP_REASONS], device)
    rec = dict(step=state.step, epoch=state.epoch, stage=state.stage, view=view,
               val_loss=nll / ntok if ntok else None, mc=None, da=None, n=None,
               **{f"skipped_{r}": int(n) for r, n in zip(SKIP_REASONS, skipped)})
    if accuracy and engine.zero_optimization_stage() < 3:
        from mmcoconut.eval.evaluate import evaluate

        # the eval path: per-sample latents of this stage (Coconut's rule), scored over the expected set
        res = evaluate(model, tokenizer, processor, cfg, cfg.data.val_shards, views=[view], out_dir=None,
                       rank=rank, world_size=world, n_latents=None, stage=state.stage,
                       max_samples=cfg.eval.val_samples, verbose=False)[view]
        rec.update(mc=res["mc"], da=res["da"], n=res["n"], n_scored=res.get("n_scored"),
                   n_missing=res.get("n_missing"))
    engine.train()
    tracker.log("val", **rec)
    if rank == 0:
        print(f"val: epoch {state.epoch} stage {state.stage} loss {rec['val_loss']} mc {rec['mc']}", flush=True)
    return rec
