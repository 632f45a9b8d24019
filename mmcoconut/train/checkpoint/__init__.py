"""Checkpoints of a training run, for both engines: what is saved and restored (manager.py), which checkpoint a run
resumes from (resume.py), the per-run index and completeness markers (index.py), the run-dir lock (lock.py), the
config-drift check (drift.py), DeepSpeed universal checkpoints (universal.py) and the restartable train state
(states.py)."""
