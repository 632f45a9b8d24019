"""Validation during training: loss on the val shards, and (when due) MC/DA accuracy by generation. RNG-neutral:
training after it is the same as without it (exact resume from epoch ends)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mmcoconut.data.curriculum import stage_for_epoch

from .batches import to_device
from .checkpoint.states import rng_neutral


def val_accuracy_due(cfg, epoch: int) -> bool:
    """Whether the validation after `epoch` also generates (eval.val_accuracy: every epoch, at the last epoch of
    each curriculum stage and of the run, or never)."""
    stage = stage_for_epoch(cfg.curriculum, epoch)
    last_of_stage = epoch + 1 == cfg.train.num_epochs or stage_for_epoch(cfg.curriculum, epoch + 1) != stage
    return {"epoch": True, "stage_end": last_of_stage, "never": False}[cfg.eval.val_accuracy]


def _all_sum(values: list, device) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def validate(trainer, accuracy: bool = True) -> dict:
    """Val loss (token-weighted, valid rows only) on up to eval.val_samples, then (`accuracy`) MC/DA accuracy by
    generation in the view matching training (where the engine allows it: not ZeRO-3). Samples the val loader
    skipped are reported per reason (`skipped_<reason>`, all ranks). Logged as a "val" record and returned."""
    with rng_neutral(), torch.no_grad():
        return _validate(trainer, accuracy)


def _validate(trainer, accuracy: bool) -> dict:
    from mmcoconut.data.eval_loader import EvalLoader
    from mmcoconut.data.pipeline import SKIP_REASONS

    cfg, engine, state, rank, world = trainer.cfg, trainer.engine, trainer.state, trainer.rank, trainer.world
    model, c = engine.module, cfg.curriculum
    view = "coconut" if c.coconut and not c.no_cot else "nocot" if c.no_cot else "cot"
    device, dtype = engine.device, engine.dtype
    loader = EvalLoader(cfg.data.val_shards, trainer.tokenizer, trainer.processor, cfg, view="train", n_latents=None,
                        batch_size=engine.spec.micro_batch_size, rank=rank, world_size=world,
                        n_image_tokens=model.n_image_tokens, max_samples=cfg.eval.val_samples, stage=state.stage,
                        with_labels=True)
    engine.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    ntok = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        valid = torch.tensor(batch["valid"]).to(device, non_blocking=True)
        batch = to_device({k: v for k, v in batch.items() if k not in ("meta", "valid")}, device, dtype)
        # the label-only loss (no [B, T, V] logits); padding rows (valid=False) carry no labels (eval_loader)
        labels = batch["labels"][:, 1:].masked_fill(~valid[:, None], -100)
        n = (labels != -100).sum()
        nll, ntok = nll + engine.forward(dict(batch, return_logits=False)).loss.double() * n, ntok + n
    skips = loader.skips.as_dict()
    nll, ntok, *skipped = _all_sum([nll, ntok] + [skips[r] for r in SKIP_REASONS], device)
    rec = dict(step=state.step, epoch=state.epoch, stage=state.stage, view=view,
               val_loss=nll / ntok if ntok else None, mc=None, da=None, n=None,
               **{f"skipped_{r}": int(n) for r, n in zip(SKIP_REASONS, skipped)})
    if accuracy and engine.generation_ok:
        from mmcoconut.eval.evaluate import evaluate

        # the eval path: per-sample latents of this stage (Coconut's rule), scored over the expected set
        with engine.generating():
            res = evaluate(model, trainer.tokenizer, trainer.processor, cfg, cfg.data.val_shards, views=[view],
                           out_dir=None, rank=rank, world_size=world, n_latents=None, stage=state.stage,
                           max_samples=cfg.eval.val_samples, verbose=False)[view]
        rec.update(mc=res["mc"], da=res["da"], n=res["n"], n_scored=res.get("n_scored"),
                   n_missing=res.get("n_missing"))
    engine.train()
    trainer.tracker.log("val", **rec)
    if rank == 0:
        print(f"val: epoch {state.epoch} stage {state.stage} loss {rec['val_loss']} mc {rec['mc']}", flush=True)
    return rec
