"""SD-DiT (Zhu et al. 2024): the discriminative self-supervised term on a DiT."""
