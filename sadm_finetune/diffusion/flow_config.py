"""Config section of the flow-matching noise process (Stable Diffusion 3 / 3.5): how training timesteps are
drawn, how the per-sample loss is weighted and whether the output is preconditioned, the options of diffusers'
train_dreambooth_lora_sd3.py. The dataclass defaults are the neutral ones (uniform timesteps, velocity loss);
Stable Diffusion 3 gets its script's defaults (logit_normal, precondition_outputs) from family_defaults.py.
Flags derive from these fields like every other (flags.py); DDPM families refuse them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..utils.errors import ConfigError
from ..config.fields import help_field as _f

WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


@dataclass
class FlowMatchingConfig:
    weighting_scheme: Literal[WEIGHTING_SCHEMES] = _f(
        "none", "Flow matching (SD3): timestep density and loss weighting (diffusers' compute_density_for_timestep_"
        "sampling / compute_loss_weighting_for_sd3). none: uniform timesteps, unweighted loss; logit_normal / mode: "
        "timesteps drawn from that density (SD3 paper; logit_normal is Stable Diffusion 3's family default, as in "
        "diffusers' train_dreambooth_lora_sd3.py); sigma_sqrt / cosmap: uniform timesteps, loss weighted per sample.",
    )
    logit_mean: float = _f(0.0, "Mean of the logit-normal timestep density (weighting_scheme logit_normal).")
    logit_std: float = _f(1.0, "Std of the logit-normal timestep density (weighting_scheme logit_normal).")
    mode_scale: float = _f(1.29, "Scale of the mode timestep density (weighting_scheme mode).")
    precondition_outputs: bool = _f(
        False, "Flow matching (SD3): precondition the output as diffusers' SD3 script does (EDM, Karras et al. 2022, "
        "section 5): the prediction converted to clean latents, x_t - sigma * v, is compared to the latents, i.e. the "
        "velocity loss weighted by sigma^2. On by default for Stable Diffusion 3 (family default); "
        "--no_precondition_outputs trains on the plain velocity loss.",
    )

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError("logit_std", f"must be > 0, got {self.logit_std}", "use e.g. 1.0")
