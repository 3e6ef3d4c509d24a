"""gitCheckout against a real daemon: clones of repositories that live inside the room (rooms
have no network yet), the branch actually checked out, depth, and every GIT_* error code."""

from __future__ import annotations

from typing import Any

import pytest

from sandboxd import errors

pytestmark = pytest.mark.integration

MAKE_REPO = (
    "set -e; export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t "
    "GIT_COMMITTER_EMAIL=t@t; mkdir -p /srv/origin.git; cd /srv/origin.git; "
    "git init -q -b trunk .; echo one > a.txt; git add a.txt; git commit -qm one; "
    "echo two >> a.txt; git commit -qam two; git checkout -qb feature; echo f > f.txt; "
    "git add f.txt; git commit -qm feature; git checkout -q trunk"
)


def call(client: Any, room: str, **params: Any) -> Any:
    return client.call("gitCheckout", {"sandboxId": room, **params})


@pytest.fixture
def repo(client: Any, room_id: str) -> str:
    r = client.sandbox(room_id).exec(MAKE_REPO)
    assert r.exit_code == 0, r.stderr
    return "/srv/origin.git"


def test_clone_default_target_and_branch(client: Any, room_id: str, repo: str) -> None:
    r = call(client, room_id, repoUrl=repo)
    assert r == {"success": True, "repoUrl": repo, "branch": "trunk",
                 "targetDir": "/workspace/origin"}
    out = client.sandbox(room_id).exec("cat /workspace/origin/a.txt; ls /workspace/origin")
    assert out.stdout == "one\ntwo\na.txt\n"


def test_clone_branch_target_and_depth(client: Any, room_id: str, repo: str) -> None:
    r = call(client, room_id, repoUrl=f"file://{repo}", branch="feature", targetDir="src/f",
             depth=1)
    assert r["branch"] == "feature" and r["targetDir"] == "/workspace/src/f"
    out = client.sandbox(room_id).exec("cd /workspace/src/f && cat f.txt && "
                                       "git rev-list --count HEAD")
    assert out.stdout == "f\n1\n"  # depth 1 over file://: a single commit


def test_repository_not_found(client: Any, room_id: str) -> None:
    with pytest.raises(errors.GitRepositoryNotFound) as info:
        call(client, room_id, repoUrl="/workspace/no-such-repo")
    assert info.value.code == "GIT_REPOSITORY_NOT_FOUND"
    client.sandbox(room_id).exec("mkdir -p /workspace/plain")
    with pytest.raises(errors.GitRepositoryNotFound):
        call(client, room_id, repoUrl="file:///workspace/plain", targetDir="/tmp/p")


def test_branch_not_found(client: Any, room_id: str, repo: str) -> None:
    with pytest.raises(errors.GitBranchNotFound) as info:
        call(client, room_id, repoUrl=repo, branch="nope", targetDir="/tmp/x")
    assert info.value.code == "GIT_BRANCH_NOT_FOUND" and info.value.context["branch"] == "nope"


@pytest.mark.parametrize("url", ["--upload-pack=touch /tmp/pwned", "-u",
                                 "ext::sh -c touch% /tmp/pwned", "fd::17", "", "not a url",
                                 "foo\nbar", "relative/path"])
def test_invalid_git_url_never_reaches_git(client: Any, room_id: str, url: str) -> None:
    with pytest.raises(errors.InvalidGitUrl) as info:
        call(client, room_id, repoUrl=url)
    assert info.value.code == "INVALID_GIT_URL"
    assert client.sandbox(room_id).exec("test -e /tmp/pwned").exit_code == 1


def test_unreachable_remote_is_a_clone_failure(client: Any, room_id: str) -> None:
    # No network in rooms yet: a remote URL fails inside the room, reported as a GIT_* error.
    with pytest.raises(errors.GitError) as info:
        call(client, room_id, repoUrl="https://github.com/octocat/Hello-World.git",
             timeout=20_000)
    assert info.value.code in ("GIT_CLONE_FAILED", "GIT_REPOSITORY_NOT_FOUND")


def test_clone_into_non_empty_directory_fails(client: Any, room_id: str, repo: str) -> None:
    client.sandbox(room_id).exec("mkdir -p /workspace/busy && touch /workspace/busy/x")
    with pytest.raises(errors.GitCloneFailed) as info:
        call(client, room_id, repoUrl=repo, targetDir="busy")
    assert info.value.code == "GIT_CLONE_FAILED" and "busy" in info.value.message


def test_bad_branch_name_and_target_are_validation_errors(client: Any, room_id: str,
                                                          repo: str) -> None:
    for branch in ("-b", "a..b", "x y", ""):
        with pytest.raises(errors.ValidationError):
            call(client, room_id, repoUrl=repo, branch=branch)
    with pytest.raises(errors.ValidationError):
        call(client, room_id, repoUrl=repo, targetDir="a\x00b")
