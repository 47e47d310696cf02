"""lmdfx.bev.files: atomic writes (an interrupted writer leaves no partial file and the old file
whole) and the --out folder check."""

from __future__ import annotations

import os
import stat

import pytest

from lmdfx.bev import viz
from lmdfx.bev.files import atomic_open, check_out_folder, write_text
from lmdfx.errors import LMDError


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_writes_the_whole_file_with_the_usual_permissions(tmp_path):
    path = write_text(tmp_path / "report.md", "# title\nµ ± é\n")
    assert path.read_text(encoding="utf-8") == "# title\nµ ± é\n"
    assert _names(tmp_path) == ["report.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not the 0600 of a mkstemp file


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_writer_that_fails_midway_leaves_no_partial_file(tmp_path, error):
    path = tmp_path / "report.json"
    with pytest.raises(error):
        with atomic_open(path) as handle:
            handle.write('{"half": ')
            handle.flush()
            raise error
    assert _names(tmp_path) == []  # neither the file nor the temporary one


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_writer_that_fails_midway_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "report.json"
    path.write_text("old, complete")
    with pytest.raises(error):
        with atomic_open(path) as handle:
            handle.write("new, but cut short")
            raise error
    assert path.read_text() == "old, complete"
    assert _names(tmp_path) == ["report.json"]


def test_binary_writes_replace_the_old_file_when_complete(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    with atomic_open(path, "wb") as handle:
        handle.write(b"\x89PNG")
        assert path.read_bytes() == b"old"  # until the block ends the old file is what readers see
    assert path.read_bytes() == b"\x89PNG"
    assert _names(tmp_path) == ["figure.png"]


def test_only_write_modes(tmp_path):
    for mode in ("a", "r", "w+"):
        with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
            with atomic_open(tmp_path / "x", mode):
                pass


def test_figures_are_saved_atomically(tmp_path):
    path = tmp_path / "components.png"
    path.write_bytes(b"old figure")

    class Broken:  # matplotlib failing (or Ctrl-C) halfway through a PNG
        def savefig(self, handle, format):
            handle.write(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        viz._save(Broken(), path)
    assert path.read_bytes() == b"old figure"
    assert _names(tmp_path) == ["components.png"]


def test_check_out_folder(tmp_path, monkeypatch):
    assert check_out_folder(tmp_path) == tmp_path
    assert check_out_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(LMDError, match="--out '.*file' is an existing file, not a folder"):
        check_out_folder(tmp_path / "file")
    with pytest.raises(LMDError, match="cannot be created: '.*file' is a file, not a folder"):
        check_out_folder(tmp_path / "file" / "sub")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(LMDError, match="--report folder '.*' is not writable"):
        check_out_folder(tmp_path, "--report")
    with pytest.raises(LMDError, match="cannot be created: '.*' is not writable"):
        check_out_folder(tmp_path / "a" / "b")
