"""REPA (Yu et al. 2024): representation alignment as a loss term, and its cached encoder features."""
