"""Which latents fire: tokens since each latent last fired, counted over the global batch on every rank alike, so the
dead mask fed to AuxK and the resampler is identical everywhere."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_ranks_any(mask: torch.Tensor) -> torch.Tensor:
    """OR of a bool mask over all ranks (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    counts = mask.to(torch.int32)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts > 0


class FiringStats:
    def __init__(self, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def update(self, fired: torch.Tensor, global_tokens: int) -> None:
        """`fired`: this rank's bool [d_sae] mask for the step; `global_tokens`: rows in the global batch."""
        fired = all_ranks_any(fired.detach().to(self.tokens_since_fired.device))
        self.tokens_since_fired += global_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)  # no host sync, unlike boolean indexing

    def dead_mask(self, after_tokens: int) -> torch.Tensor:
        return self.tokens_since_fired >= after_tokens

    def dead_fraction(self, after_tokens: int) -> float:
        return self.dead_mask(after_tokens).float().mean().item()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        loaded = state["tokens_since_fired"]
        if loaded.shape != self.tokens_since_fired.shape:
            raise ValueError(f"firing stats: checkpoint has {loaded.shape[0]} latents, the SAE {self.tokens_since_fired.shape[0]}")
        self.tokens_since_fired.copy_(loaded)
