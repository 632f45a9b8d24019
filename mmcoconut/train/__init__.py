"""Training: `python -m mmcoconut.train CONFIG [--train.engine=deepspeed|fsdp2]` (mmcoconut/cli/train.py).

trainer.py (the Trainer: set-up, epochs, train_step), step.py (one step's collective, bookkeeping and decision),
batches.py (the batch stream), validate.py, faults.py (test-only fault injection), schedule.py (LR),
engines/ (base.py: the seam; deepspeed.py + ds_config.py + ds_ops.py; fsdp.py + fsdp_config.py; rank_agreement.py),
checkpoint/ (manager.py: save/restore of every state; resume.py, index.py, lock.py, drift.py, universal.py),
signals.py (stop requests), launcher_watch.py (a rank stops when its launcher dies), tracking.py (metrics.jsonl,
wandb), preflight.py (checks before anything is built).
"""
