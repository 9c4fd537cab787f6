"""sftrl.io's atomic writes: a directory is published whole, and the temporaries a killed writer left are removed
by the next write of the same path (tests/workflow/test_kill_resume.py met one: a kill -9 during an SFT export
left results/sft/.checkpoint-4.<random> behind the resumed run)."""
import pytest

from sftrl.io import atomic_dir


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint-4[1]"  # glob characters in the name are matched literally
    stale = tmp_path / ".checkpoint-4[1].k1ll3d_x"  # the shape of mkdtemp's names
    (stale / "part").mkdir(parents=True)
    other = tmp_path / ".checkpoint-40.keep0000"  # another path's temporaries: not this write's business
    other.mkdir()
    longer = tmp_path / ".checkpoint-4[1].5.abcd1234"  # (a target named checkpoint-4[1].5)
    longer.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("weights")
    assert (target / "model.safetensors").read_text() == "weights"
    assert not stale.exists() and other.exists() and longer.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, longer.name, target.name])


def test_a_failed_write_leaves_neither_the_path_nor_a_temporary(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
