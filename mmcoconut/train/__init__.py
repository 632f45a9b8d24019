"""DeepSpeed training: `python -m mmcoconut.train CONFIG --deepspeed ds_configs/X.json` (mmcoconut/cli/train.py).

engine.py (ds_config resolution, deepspeed.initialize), schedule.py (LR), loop.py (the loop), checkpoint.py
(save/resume/keep-last), universal.py (elastic resume), tracking.py (metrics.jsonl, wandb).
"""
