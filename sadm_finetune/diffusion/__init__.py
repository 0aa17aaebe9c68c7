"""The diffusion objective: noise processes, the per-sample denoising losses, VAE latents."""
