"""Writing and reading trained models: the Hugging Face export (hf_export.py), DeepSpeed checkpoints
(ds_checkpoint.py) and starting weights for a run (init_from.py). The exported code itself is mmcoconut/modeling."""
