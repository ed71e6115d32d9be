import os
import stat

from ftedit.atomic import write_bytes_atomic


def test_atomic_files_get_the_mode_a_plain_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_bytes_atomic(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_bytes() == b"{}"
