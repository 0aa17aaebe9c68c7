"""sadm-finetune: fine-tune diffusers pipelines with SADM (structure-guided adversarial training)."""

__version__ = "0.1.0"
