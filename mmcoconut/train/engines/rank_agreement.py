"""What the ranks of a multi-rank run agree on inside the model's forward and generation, installed on the model
by the engine (the model itself knows no process group; see MMCoconut.agree_pass_count / agree_stop).

- Pass count: every rank makes the same number of LM calls per micro-batch (MAX of the local counts), as sharded
  weights require (their gathers are collectives). Agreed on CPU data over gloo (the default group when it is gloo,
  else a gloo side group made once): no device->host sync.
- Generation stop (sharded weights only): a rank keeps stepping until every rank is done.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_GLOO_GROUP = None


def _cpu_group():
    """None (the default group) when it is gloo, else a gloo group over the same ranks, made once."""
    global _GLOO_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.new_group(backend="gloo")
    return _GLOO_GROUP


def agree_max(value: int) -> int:
    """MAX of `value` over the ranks, on CPU data (no device sync)."""
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(t[0])


def all_ranks_done(done: bool) -> bool:
    """True when `done` holds on every rank."""
    t = torch.tensor([0 if done else 1], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(t[0]) == 0


def install(model, stop_together: bool) -> None:
    """With more than one rank: agree on pass counts (always) and on generation stops (`stop_together`: sharded
    weights). One process: nothing to agree on, the hooks stay None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    model.agree_pass_count = agree_max
    model.agree_stop = all_ranks_done if stop_together else None
