"""terms/repa/config.py and terms/sddit/config.py: REPA's and SD-DiT's sections, off at weight 0, with one-line range checks."""

import pytest

from sadm_finetune.terms.repa.config import RepaConfig
from sadm_finetune.terms.sddit.config import SDDiTConfig
from sadm_finetune.utils.errors import ConfigError


def test_a_weight_of_zero_turns_a_term_off():
    assert not RepaConfig().enabled and RepaConfig(repa_weight=0.5).enabled
    assert not SDDiTConfig().enabled and SDDiTConfig(sddit_weight=0.1).enabled


@pytest.mark.parametrize("cls, kwargs, field", [
    (RepaConfig, {"repa_weight": -1.0}, "repa_weight"),
    (RepaConfig, {"repa_depth": 0}, "repa_depth"),
    (RepaConfig, {"repa_encoder_resolution": 0}, "repa_encoder_resolution"),
    (SDDiTConfig, {"sddit_weight": -0.1}, "sddit_weight"),
    (SDDiTConfig, {"sddit_encoder_depth": 0}, "sddit_encoder_depth"),
    (SDDiTConfig, {"sddit_ema_decay": 1.0}, "sddit_ema_decay"),
    (SDDiTConfig, {"sddit_mask_ratio": -0.1}, "sddit_mask_ratio"),
    (SDDiTConfig, {"sddit_teacher_temperature": 0.0}, "sddit_teacher_temperature"),
])
def test_out_of_range_values_name_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.field == field
