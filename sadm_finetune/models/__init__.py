"""Models: pipeline loading and family adapters, LoRA, and the structure discriminator."""
