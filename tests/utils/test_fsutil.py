"""utils/fsutil.py: move_into_place leaves the destination old-complete or new-complete."""

import os

import pytest

from sadm_finetune.utils import fsutil
from sadm_finetune.utils.fsutil import move_into_place


def test_a_folder_replaces_a_folder_and_the_old_one_is_removed(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old.txt").write_text("old")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "new.txt").write_text("new")
    move_into_place(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["new.txt"]


def test_a_failed_swap_keeps_the_old_folder_aside_not_a_mix(tmp_path, monkeypatch):
    """The replace of src onto dst fails: dst's old content is in the stale sibling, never merged with src."""
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old.txt").write_text("old")
    (tmp_path / "src").mkdir()
    real_replace, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk gone")
        return real_replace(a, b)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(OSError):
        move_into_place(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / ".tmp-old-dst" / "old.txt").read_text() == "old" and not (tmp_path / "dst").exists()


def test_a_leftover_stale_folder_is_cleared_and_a_file_replaces_a_file(tmp_path):
    (tmp_path / ".tmp-old-dst").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src").mkdir()
    move_into_place(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    (tmp_path / "a.json").write_text("new")
    (tmp_path / "b.json").write_text("old")
    move_into_place(tmp_path / "a.json", tmp_path / "b.json")
    assert (tmp_path / "b.json").read_text() == "new" and not (tmp_path / "a.json").exists()
