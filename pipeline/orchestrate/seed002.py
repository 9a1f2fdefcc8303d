"""Seed 002's published numbers, which the sweep table and plots show next to a sweep's own.

Source: the blog post "Sparse Autoencoders for Monosemanticity" (the project's seed 002), its tables "Dead Neuron
Proportions" (without resampling), "Dead Neuron Proportions With Sampling", "Monosemanticity Proportions Without
Sampling" and "... With Sampling". Its setup: GPT-2 small, residual stream of layer 6 (d = 768), OpenWebText-10k,
ReLU SAE with loss MSE + λ·L1, Adam, 20 epochs on one A100, resampling every 25,000 steps. A latent counts as dead
there when all its activations are below 0.07; monosemanticity is the share of 50 features (the top and bottom 25 by
selectivity) that an LLM labelled with a coherent theme. Its λ values are in its own loss units (MSE averaged over
d on raw GPT-2 activations), not this project's (squared error summed over d on inputs scaled to E‖x‖ = √d), so
cells are matched to them by rank: the larger λ of a two-λ grid to 1e-2, the smaller to 1e-4.
"""
from __future__ import annotations

SOURCE = ('seed 002, "Sparse Autoencoders for Monosemanticity" (GPT-2 small layer 6, OpenWebText-10k, ReLU SAE; '
          "dead = every activation < 0.07)")
EXPANSIONS = (4, 8, 16, 32)
LAMBDAS = (1e-2, 1e-4)  # in the seed's loss units

# (λ, resampling) -> dead-latent percentage per expansion factor 4, 8, 16, 32
DEAD_PCT = {
    (1e-2, False): (13.1, 26.3, 29.3, 35.2),
    (1e-4, False): (15.4, 27.5, 33.4, 35.6),
    (1e-2, True): (4.8, 3.9, 15.7, 26.97),
    (1e-4, True): (5.24, 4.51, 11.72, 23.43),
}
# (λ, resampling) -> monosemantic share (%) of the labelled features per expansion factor
MONOSEMANTIC_PCT = {
    (1e-2, False): (82, 86, 84, 86),
    (1e-4, False): (82, 82, 80, 78),
    (1e-2, True): (72, 78, 88, 80),
    (1e-4, True): (80, 78, 78, 76),
}


def seed_lambda(lam: float, grid_lambdas: list[float]) -> float | None:
    """The seed's λ a cell's λ stands for: by rank within a grid of exactly two λ values, else none."""
    if len(grid_lambdas) != 2 or lam not in grid_lambdas:
        return None
    return LAMBDAS[0] if lam == max(grid_lambdas) else LAMBDAS[1]


def reference(expansion: int, lam: float | None, resample: bool) -> dict:
    """The seed's dead % and monosemantic share for one cell, or {} where the seed has no such cell."""
    if lam is None or expansion not in EXPANSIONS:
        return {}
    i = EXPANSIONS.index(expansion)
    return {"seed002_lambda": lam, "seed002_dead_pct": DEAD_PCT[(lam, resample)][i],
            "seed002_monosemantic_pct": MONOSEMANTIC_PCT[(lam, resample)][i]}


def markdown_tables() -> str:
    """The seed's tables as it published them."""
    header = "| λ (seed's units) | " + " | ".join(f"{e}×" for e in EXPANSIONS) + " |"
    rule = "|---|" + "---|" * len(EXPANSIONS)
    parts = []
    for title, table in (("dead latents (%)", DEAD_PCT), ("monosemantic share (%)", MONOSEMANTIC_PCT)):
        for resample in (False, True):
            parts.append(f"**{title}, {'with' if resample else 'without'} resampling**\n\n{header}\n{rule}")
            for lam in LAMBDAS:
                parts[-1] += f"\n| {lam:g} | " + " | ".join(f"{v:g}" for v in table[(lam, resample)]) + " |"
    return "\n\n".join(parts)
