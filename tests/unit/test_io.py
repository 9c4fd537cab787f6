"""sftrl.io's atomic writes: a directory is published whole, and the temporaries a killed writer left are removed
by the next write of the same path (tests/workflow/test_kill_resume.py met one: a kill -9 during an SFT export
left results/sft/.checkpoint-4.<random> behind the resumed run; once its SVD stage was really interrupted, a kill
during an SVD shard's write left the shard's temporary and safetensors' own `.tmpXXXXXX` beside it)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from sftrl.io import atomic_dir, atomic_path


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


def test_a_file_writers_leftovers_stay_in_its_scratch_directory_which_the_next_write_removes(tmp_path):
    target = tmp_path / "layers000-001.safetensors"
    # what a kill -9 during save_file left: the scratch directory, the half file, safetensors' own temporary
    stale = tmp_path / ".layers000-001.safetensors.k1ll3d_x"
    stale.mkdir()
    (stale / "layers000-001.safetensors").write_bytes(b"half")
    (stale / ".tmpMDHtfK").write_bytes(b"half")
    sibling = tmp_path / "layers002-003.safetensors"  # another shard, written by another job: untouched
    sibling.write_bytes(b"other shard")
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".safetensors" and tmp.parent != tmp_path
        save_file({"u": torch.ones(2, 2)}, str(tmp))
    assert torch.equal(load_file(target)["u"], torch.ones(2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, sibling.name])


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
