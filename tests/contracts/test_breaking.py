"""The proto contracts' breaking-change guard (`make lint` runs
``scripts/buf_breaking.sh``): in a throwaway git repository holding a copy of
``proto/`` tagged as a release, an additive change passes and a planted breaking one
(a field deleted, a field's type changed) fails, naming it. A clone without the tag
checks against the commit ``proto/RELEASED`` names; with no release at all the guard
says it skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "buf_breaking.sh"
BUF = REPO / ".venv" / "bin" / "buf"
KEYS = Path("proto/sluice/keys/v1/keys.proto")

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by make install")

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **_GIT_ENV}
    )


def guard(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), str(repo)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "BUF": str(BUF)},
        timeout=120,
    )


@pytest.fixture
def released(tmp_path: Path) -> Path:
    """A repository whose proto/ is this one's, tagged v0.1.0."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "proto", repo / "proto")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "release")
    git(repo, "tag", "-a", "v0.1.0", "-m", "first release")
    return repo


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / KEYS
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_without_a_release_the_guard_skips(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "proto", repo / "proto")
    (repo / "proto" / "RELEASED").unlink()
    git(repo, "init", "-q")
    out = guard(repo)
    assert out.returncode == 0, out.stderr
    assert "skipped, no release yet" in out.stdout


def _head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_clone_without_the_tag_checks_against_the_release_commit(released: Path) -> None:
    """Tags do not always travel with a clone: proto/RELEASED names the commit."""
    commit = _head(released)
    git(released, "tag", "-d", "v0.1.0")
    (released / "proto" / "RELEASED").write_text(f"# the last release\nv0.1.0 {commit}\n")
    git(released, "commit", "-qam", "name the release")
    out = guard(released)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"against v0.1.0 (commit {commit}" in out.stdout
    edit(released, "  string secret_prefix = 21;\n", "")
    out = guard(released)
    assert out.returncode != 0
    assert 'field "21" with name "secret_prefix"' in out.stdout + out.stderr


def test_a_release_commit_missing_from_the_clone_fails(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "proto", repo / "proto")
    (repo / "proto" / "RELEASED").write_text("v0.1.0 " + "0" * 40 + "\n")
    git(repo, "init", "-q")
    out = guard(repo)
    assert out.returncode != 0
    assert "is not in this clone" in out.stderr


def test_an_additive_change_passes(released: Path) -> None:
    out = guard(released)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "against v0.1.0" in out.stdout
    edit(
        released,
        "  string secret_prefix = 21;",
        "  string secret_prefix = 21;\n  string added = 99;",
    )
    git(released, "commit", "-qam", "add a field")
    out = guard(released)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_deleted_field_fails_against_the_release(released: Path) -> None:
    edit(released, "  string secret_prefix = 21;\n", "")
    out = guard(released)  # the working tree against the tag: uncommitted changes count
    assert out.returncode != 0
    assert 'field "21" with name "secret_prefix"' in out.stdout + out.stderr


def test_a_changed_field_type_fails_against_the_release(released: Path) -> None:
    edit(released, "  int64 expires_unix = 14;", "  string expires_unix = 14;")
    git(released, "commit", "-qam", "retype a field")
    out = guard(released)
    assert out.returncode != 0
    assert "expires_unix" in out.stdout + out.stderr
