"""Training data: datasets and image folders, buckets, the loader, latent and text caches, DreamBooth class images."""
