"""What trains in the denoiser besides a full fine-tune: LoRA (peft), DiffFit, the kohya LoRA file format."""
