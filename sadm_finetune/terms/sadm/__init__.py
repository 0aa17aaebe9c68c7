"""SADM (Yang et al., CVPR 2024): the structure objective, its discriminator and its loss term."""
