"""The set-up scripts' own checks (scripts/_common.sh), run through bash without creating any venv."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("df") is None, reason="needs bash and df")


def need_disk(path: Path | str, gib: int) -> subprocess.CompletedProcess:
    script = f'source "{ROOT}/scripts/_common.sh"; need_disk "$1" "$2"; echo passed'
    return subprocess.run(["bash", "-c", script, "need_disk", str(path), str(gib)], capture_output=True, text=True)


def test_need_disk_stops_with_a_clear_message_when_space_is_short(tmp_path):
    r = need_disk(tmp_path, 10**9)  # an exabyte: more than any file system here has free
    assert r.returncode == 1
    assert "passed" not in r.stdout
    assert f"installing into {tmp_path} needs about {10**9} GiB of free disk;" in r.stderr
    assert "GiB free" in r.stderr


def test_need_disk_passes_when_space_suffices(tmp_path):
    r = need_disk(tmp_path, 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "passed"


def test_need_disk_skips_where_df_cannot_tell(tmp_path):
    r = need_disk(tmp_path / "missing" / "dir", 10**9)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "passed"
