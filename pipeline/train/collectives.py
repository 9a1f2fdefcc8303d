"""Host-side agreement between ranks: the preemption flag, the checkpoint to resume, barriers around rank-0 work.

They run over gloo on CPU tensors even when training uses NCCL, so a per-step flag check never waits for the GPU
stream (an NCCL all-reduce read back with .item() would drain it every step)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class Control:
    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.group = None
        if self.world > 1:
            # new_group is itself collective: every rank constructs Control at the same point of setup.
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.group)
        return int(t.item())

    def broadcast_str(self, value: str, max_bytes: int = 4096) -> str:
        """Rank 0's string on every rank, as bytes in an int tensor (no pickle, unlike broadcast_object_list)."""
        if self.world == 1:
            return value
        data = value.encode()[:max_bytes]
        t = torch.zeros(max_bytes + 1, dtype=torch.int32)
        t[0] = len(data)
        t[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.int32)
        dist.broadcast(t, src=0, group=self.group)
        return bytes(t[1 : 1 + int(t[0])].to(torch.uint8).tolist()).decode()

    def all_sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)
