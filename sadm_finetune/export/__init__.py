"""Outputs of a run: the stock pipeline or LoRA files, sample grids, the model card, the Hub push."""
