"""Pipeline families: one adapter per diffusers pipeline (DiT, SD, SDXL, SD3, Flux, PixArt), loading and the VAE."""
