"""FSDP2 checkpoints (torch.distributed.checkpoint, mmcoconut/train/engines/fsdp.py) -> full fp32 weights and the
run config, in one CPU process (no launcher, no process group): DCP reshards to whole tensors on load.

A tag dir holds DCP's `.metadata` + `*.distcp` files (keys `model.<name>`, `optimizer.*`) and `client_state.pt`
(the resolved config among the train state). Frozen weights are not in it (the vision tower comes from
model.vision_id again, as for DeepSpeed checkpoints).
"""
from __future__ import annotations

from pathlib import Path

import torch

CLIENT_STATE = "client_state.pt"


def is_dcp_checkpoint(tag_dir) -> bool:
    d = Path(tag_dir)
    return (d / ".metadata").is_file() and (d / CLIENT_STATE).is_file()


def dcp_config(tag_dir) -> dict:
    """The resolved run config the checkpoint was trained with."""
    client = torch.load(Path(tag_dir) / CLIENT_STATE, map_location="cpu", weights_only=False)
    return client["config"]


def dcp_state_dict(tag_dir) -> dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint, whole and in fp32 (floating ones)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(tag_dir))
    meta = reader.read_metadata().state_dict_metadata
    model = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(model, storage_reader=reader, no_dist=True)
    return {k[len("model."):]: v.float() if v.is_floating_point() else v for k, v in model.items()}
