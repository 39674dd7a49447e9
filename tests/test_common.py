"""common.py: atomic writes and device choice."""
import pickle

import pytest
import torch

from core.common import (FORMATS_BY_SUFFIX, IMAGE_EXTENSIONS, UserError, pick_device, remove_stale_temp_files,
                         save_atomic, split_at_dashes)


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "m.pth"
    save_atomic({"v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises((RuntimeError, pickle.PicklingError)):
        save_atomic({"v": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    save_atomic({"v": 1}, tmp_path / "last.pth")
    (tmp_path / ".last.pth.k3j_x9.tmp").write_bytes(b"half a checkpoint")  # a save killed midway
    (tmp_path / "notes.tmp").write_text("not ours")
    remove_stale_temp_files(tmp_path, "*.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "notes.tmp"]


def test_pick_device(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type in ("mps", "cpu")
    with pytest.raises(UserError, match="sees no CUDA GPU; use --device cpu"):
        pick_device("cuda:1")


def test_jfif_and_jpe_are_jpeg_extensions():
    assert {".jfif", ".jpe", ".jpg", ".jpeg"} <= IMAGE_EXTENSIONS
    assert {FORMATS_BY_SUFFIX[s] for s in (".jfif", ".jpe", ".jpg", ".jpeg")} == {"JPEG"}
    assert not {".heic", ".txt", ".db", ""} & IMAGE_EXTENSIONS


def test_provenance_names_the_command_commit_and_machine():
    import shutil
    import subprocess

    from core.common import PROJECT_DIR, markdown_table, provenance

    prov = provenance("bench.py", ["--data", "my photos"])
    assert prov["command"] == "python bench.py --data 'my photos'"  # quoted: it can be pasted back
    assert prov["machine"]["cpu_cores"] and prov["machine"]["torch"] == torch.__version__
    if shutil.which("git") and (PROJECT_DIR / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                              text=True).stdout.strip()
        assert prov["commit"] in (head, head + "+changes")
    assert markdown_table(["", "a"], [["x", 1]]).splitlines() == ["|  | a |", "|---|---:|", "| x | 1 |"]


def test_commit_is_marked_changed_by_code_not_by_documents(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from core import common

    if not shutil.which("git"):
        pytest.skip("needs git")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("# a\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    monkeypatch.setattr(common, "PROJECT_DIR", tmp_path)
    head = common.git_commit()
    assert len(head) >= 7 and "+" not in head
    (tmp_path / "README.md").write_text("# a figure being pasted\n")
    (tmp_path / "new.py").write_text("untracked\n")
    assert common.git_commit() == head  # documents and untracked files do not change what was measured
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.git_commit() == head + "+changes"
    monkeypatch.setattr(common, "PROJECT_DIR", tmp_path / "missing")
    assert common.git_commit() == "unknown"


def test_split_at_dashes_passes_on_what_follows_a_bare_double_dash():
    assert split_at_dashes(["--data", "d", "--", "--width", "8"]) == (["--data", "d"], ["--width", "8"])
    assert split_at_dashes(("--data", "d")) == (["--data", "d"], [])
    assert split_at_dashes(["--"]) == ([], [])


def test_cpu_isa_names_what_sets_the_speed_of_bf16_training_and_int8_kernels():
    from core.common import cpu_isa

    assert cpu_isa("fpu sse2 avx avx2 fma") == "AVX2 only"
    assert cpu_isa("avx2 avx512f avx512bw avx512_vnni") == "AVX512 VNNI"
    assert cpu_isa("avx2 avx512f avx512_vnni avx512_bf16") == "AVX512 VNNI BF16"
    assert cpu_isa("avx2 avx512f") == "AVX512" and cpu_isa("sse2") == "no AVX2" and cpu_isa("") == "unknown"
