"""Test helpers shared by several test files (moved from tests/train/test_resume.py so that each file runs alone)."""

import re

from safetensors.torch import load_file


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _resumed_step(text):
    found = re.findall(r"Resumed from \S+ at step (\d+)", text)
    assert len(found) == 1, text[-3000:]
    return int(found[0])
