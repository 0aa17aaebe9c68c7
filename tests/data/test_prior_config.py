"""data/prior_config.py: prior preservation's section refuses what it cannot use, in one line naming the field."""

import pytest

from sadm_finetune.data.prior_config import PriorPreservationConfig
from sadm_finetune.utils.errors import ConfigError


def test_the_defaults_are_off_and_diffusers_values():
    c = PriorPreservationConfig()
    assert (c.with_prior_preservation, c.num_class_images, c.prior_loss_weight, c.sample_batch_size) == (
        False, 100, 1.0, 4)
    PriorPreservationConfig(with_prior_preservation=True, class_prompt="a dog", class_data_dir="dogs")


@pytest.mark.parametrize("kwargs, field", [
    ({"with_prior_preservation": True, "class_data_dir": "dogs"}, "class_prompt"),
    ({"with_prior_preservation": True, "class_prompt": "a dog"}, "class_data_dir"),
    ({"class_prompt": "a dog"}, "class_prompt"),  # given, but nothing would use it
    ({"class_data_dir": "dogs"}, "class_data_dir"),
    ({"num_class_images": 0}, "num_class_images"),
    ({"class_inference_steps": -1}, "class_inference_steps"),
    ({"prior_loss_weight": -0.5}, "prior_loss_weight"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        PriorPreservationConfig(**kwargs)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
