"""gitCheckout: ``git clone`` run inside the room, under the room's limits.

Theory of operation. The daemon never runs git itself: the clone is an ordinary run in the room
(``runs.run_in_room``, argv form, so no shell ever sees the URL), with the room's cgroup,
seccomp filter and a wall-clock deadline; the repository lands in the room's writable layer and
counts against its disk budget. The daemon only validates the request (a URL that git would take
for an option, or a transport that runs commands, never reaches git) and turns git's stderr into
GIT_* codes. A second short run asks git which branch it actually checked out.

Remote URLs (http(s), with branch and depth) work in a room whose network policy allows the host
(docs/network.md): git runs in the room and reaches it through the room's egress forwarder; URLs
naming repositories inside the room (``/workspace/src``,
``file:///workspace/src``) are the room's own files, never the host's.
"""

from __future__ import annotations

import posixpath
import re

from .. import errors, protocol, runs
from ..context import Context
from ..roomfiles import check_path

CLONE_TIMEOUT_MS = 10 * 60 * 1000
MAX_URL = 4096

_SCHEMES = ("https://", "http://", "git://", "ssh://", "file://", "git+ssh://", "ssh+git://")
# scp-like syntax: [user@]host:path (git's rule: no slash before the first colon).
_SCP = re.compile(r"^(?:[A-Za-z0-9._~-]+@)?[A-Za-z0-9.-]+:(?!//)[^\s]+$")
_BRANCH_BAD = re.compile(r"(^-)|(\.\.)|([\x00-\x20\x7f~^:?*\[\\])|(@\{)|(^/)|(/$)|(\.lock$)|"
                         r"(^@$)|(//)|(\.$)")


def check_url(url: str) -> str:
    """INVALID_GIT_URL unless ``url`` is a plain repository address.

    Refused: anything git could parse as an option (leading ``-``), whitespace and control
    characters, and remote-helper transports (``ext::sh -c ...`` runs a command, ``fd::``).
    """
    bad = (not url or len(url) > MAX_URL or url.startswith("-")
           or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url) or "::" in url)
    ok = url.startswith(_SCHEMES) or url.startswith("/") or bool(_SCP.match(url))
    if bad or not ok:
        raise errors.InvalidGitUrl(f"not a git repository URL: {url[:200]!r}", repoUrl=url[:200])
    return url


def repo_name(url: str) -> str:
    """The directory ``git clone`` would pick: the last path component without ``.git``."""
    tail = url.rstrip("/")
    if tail.endswith("/.git"):
        tail = tail[:-5]
    tail = re.split(r"[/:]", tail)[-1]
    name = tail.removesuffix(".git")
    return name if name not in ("", ".", "..") else "repo"


def classify(stderr: str, url: str, branch: str | None) -> errors.GitError:
    """git's complaint -> a GIT_* code (git's messages are stable across 2.x)."""
    text = stderr.strip()
    low = text.lower()
    context = {"repoUrl": url, "stderr": text[-2000:]}
    if "remote branch" in low and "not found" in low:
        return errors.GitBranchNotFound(f"branch {branch!r} not found in {url}",
                                        branch=branch, **context)
    if any(s in low for s in ("does not exist", "repository not found",
                              "does not appear to be a git repository", "not found",
                              "could not read from remote repository")):
        return errors.GitRepositoryNotFound(f"repository not found: {url}", **context)
    if "unsupported protocol" in low or ("transport" in low and "not allowed" in low) \
            or "unable to find remote helper" in low:
        return errors.InvalidGitUrl(f"unsupported repository URL: {url}", **context)
    last = text.splitlines()[-1] if text else "git clone failed"
    return errors.GitCloneFailed(f"git clone failed: {last}", **context)


async def git_checkout(ctx: Context,
                       p: protocol.GitCheckoutParams) -> protocol.GitCheckoutResult:
    url = check_url(p.repo_url)
    if p.branch is not None and (not p.branch or _BRANCH_BAD.search(p.branch)):
        raise errors.ValidationError(f"invalid branch name {p.branch!r}", field="branch",
                                     branch=p.branch)
    target = p.target_dir or f"/workspace/{repo_name(url)}"
    check_path(target, "targetDir")
    target = posixpath.normpath(target if target.startswith("/") else f"/workspace/{target}")
    argv = ["git", "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never",
            "clone", "--no-progress"]
    if p.branch:
        argv += ["--branch", p.branch, "--single-branch"]
    if p.depth:
        argv += ["--depth", str(p.depth)]
    argv += ["--", url, target]
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "GIT_SSH_COMMAND": "false"}
    res = await runs.run_in_room(ctx.rooms, ctx.uid, p.sandbox_id, argv,
                                 check_limits=ctx.facts.check_run_limits, env=env, cwd=None,
                                 stdin=b"", user="root", limits=None,
                                 timeout_ms=p.timeout or CLONE_TIMEOUT_MS, on_output=None)
    if res.status == "TO":
        raise errors.GitCloneFailed(f"git clone of {url} timed out", repoUrl=url,
                                    timeout=p.timeout or CLONE_TIMEOUT_MS)
    if res.exit_code != 0:
        raise classify(res.stderr, url, p.branch)
    head = await runs.run_in_room(
        ctx.rooms, ctx.uid, p.sandbox_id,
        ["git", "-C", target, "symbolic-ref", "--short", "-q", "HEAD"],
        check_limits=ctx.facts.check_run_limits, env=env, cwd=None, stdin=b"", user="root",
        limits=None, timeout_ms=30_000, on_output=None)
    branch = head.stdout.strip() if head.exit_code == 0 else (p.branch or "")
    return protocol.GitCheckoutResult(success=True, repo_url=url, branch=branch,
                                      target_dir=target)
