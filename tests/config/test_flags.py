"""config/flags.py on a small dataclass of its own: each annotation's flag form, the --no_ switch, none for an
optional field, absent flags left out of the namespace, no abbreviations, one-line errors naming the closest flag."""

import dataclasses
from typing import Literal

import pytest

from sadm_finetune.config.fields import help_field
from sadm_finetune.config.flags import FlagParser, add_dataclass_flags
from sadm_finetune.utils.errors import ConfigError


@dataclasses.dataclass
class Section:
    name: str = help_field(dataclasses.MISSING, "Required name.")
    steps: int = help_field(10, "Number of steps.")
    rate: float | None = help_field(None, "A rate.")
    ema: bool = help_field(True, "Keep an EMA.")
    kind: Literal["a", "b"] = help_field("a", "Which kind.")
    labels: list[int] | None = help_field(None, "Some labels.")


def parser():
    p = FlagParser(prog="toy")
    add_dataclass_flags(p, {"section": Section})
    return p


def test_each_annotation_gets_its_flag_form():
    args = parser().parse_args(["--name", "x", "--steps", "3", "--rate", "none", "--no_ema", "--kind", "b",
                                "--labels", "1", "2"])
    assert vars(args) == {"name": "x", "steps": 3, "rate": None, "ema": False, "kind": "b", "labels": [1, 2]}
    assert vars(parser().parse_args(["--name", "x", "--ema", "--rate", "0.5"])) == {"name": "x", "ema": True,
                                                                                    "rate": 0.5}


@pytest.mark.parametrize("argv, start", [
    (["--name", "x", "--step", "3"], "--step: unrecognized argument; did you mean --steps?"),
    (["--name", "x", "--kind", "c"], "arguments: argument --kind: invalid choice"),
    (["--name", "x", "--steps", "many"], "arguments: argument --steps: invalid int value"),
    (["--steps", "3"], "arguments: the following arguments are required: --name"),
])
def test_errors_are_one_line_config_errors(argv, start):
    with pytest.raises(ConfigError) as info:
        parser().parse_args(argv)
    assert str(info.value).startswith(start) and "\n" not in str(info.value)


def test_help_shows_each_default():
    text = parser().format_help()
    for expected in ("(default: 10)", "(default: none)", "(default: on; --no_ema turns it off)", "(required)"):
        assert expected in " ".join(text.split())
