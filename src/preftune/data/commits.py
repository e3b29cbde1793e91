"""Code preference pairs from a repository's history, after CodeFavor's Commit-Instruct (Liu et
al., "Learning Code Preference via Synthetic Evolution", arXiv:2410.03837).

A commit that changes a function says, in its message, what the change is for; the function
after the commit is the preferred implementation of that request, the one before it the
rejected one. For every commit with one parent and a message of at least ``min_words`` words,
each Python function (or method) whose code changed, beyond comments and formatting, gives

    prompt   = the commit message, the file and the function's name, and its code before
    chosen   = the function after the commit          rejected = the function before it

Commits that change more than ``max_functions`` functions are passed over (refactors and
merges of unrelated work say little about each function), as are functions longer than
``max_chars``. The paper also rewrites commits with an LLM and adds critique-driven pairs
(Critic-Evol); neither is done here: the message is used as it is.
"""

from __future__ import annotations

import ast
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..reward.scoring import new_output_file
from .records import DataError
from .rows import write_rows

SEPARATOR = "\x1e"  # between commits in the git log output
FIELD = "\x1f"  # between a commit's hash, parents and message


@dataclass(frozen=True)
class CommitSettings:
    max_commits: int = 1000  # newest first
    min_words: int = 3  # shorter messages ("fix", "wip") say too little
    max_functions: int = 3  # commits changing more functions are passed over
    max_chars: int = 4000  # longer functions are passed over
    context: bool = True  # the prompt shows the function before the change

    def __post_init__(self):
        low = [name for name in ("max_commits", "min_words", "max_functions", "max_chars")
               if getattr(self, name) < 1]
        if low:
            raise ValueError(f"{low[0]} {getattr(self, low[0])}: at least 1.")


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                            encoding="utf-8", errors="replace")  # a file in another encoding
    if result.returncode != 0:
        raise DataError(f"git {' '.join(args[:2])} in {repo} failed: "
                        f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def functions(source: str) -> dict[str, tuple[str, str]] | None:
    """Each function and method of a Python module by qualified name: (its source, decorators
    included, and its code without comments, docstrings aside, and formatting: ``ast.dump``);
    None when the module does not parse. Functions under ``if``, ``try`` or ``with`` blocks
    count; a name defined again (a property's setter) is ``NAME (2)``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    lines = source.splitlines(keepends=True)
    found = {}

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    key, number = name, 1
                    while key in found:
                        number += 1
                        key = f"{name} ({number})"
                    found[key] = ("".join(lines[start - 1 : child.end_lineno]).rstrip("\n"),
                                  ast.dump(child))
                visit(child, f"{name}.")
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                # if / try (its except clauses) / with / for / match blocks: the same scope
                visit(child, prefix)

    visit(tree, "")
    return found


def changed_functions(before: str, after: str) -> list[tuple[str, str, str]]:
    """(name, old source, new source) of the functions present in both versions whose code
    differs (not only comments or formatting)."""
    old, new = functions(before), functions(after)
    if old is None or new is None:
        return []
    return [(name, old[name][0], new[name][0]) for name in old
            if name in new and old[name][1] != new[name][1]]


def commit_pairs(repo: Path, settings: CommitSettings) -> tuple[list[dict], dict]:
    """The pairs of ``repo``'s history (newest commit first) and what was passed over."""
    log = git(repo, "log", "--no-merges", f"--max-count={settings.max_commits}",
              f"--format=%H{FIELD}%P{FIELD}%B{SEPARATOR}")
    counts = {"commits": 0, "short_message": 0, "no_function": 0, "too_many": 0,
              "too_long": 0, "pairs": 0}
    rows = []
    for entry in filter(str.strip, log.split(SEPARATOR)):
        sha, parents, message = entry.strip("\n").split(FIELD)
        counts["commits"] += 1
        message = message.strip()
        if len(parents.split()) != 1:  # the first commit: nothing before it
            counts["no_function"] += 1
            continue
        if len(message.split()) < settings.min_words:
            counts["short_message"] += 1
            continue
        changes = []
        for path in git(repo, "diff-tree", "-z", "--no-commit-id", "-r", "--diff-filter=M",
                        "--name-only", sha).split("\0"):  # -z: names as they are (é, not \303)
            if path.endswith(".py"):
                before = git(repo, "show", f"{sha}^:{path}")
                after = git(repo, "show", f"{sha}:{path}")
                changes += [(path, *change) for change in changed_functions(before, after)]
        if not changes:
            counts["no_function"] += 1
            continue
        if len(changes) > settings.max_functions:
            counts["too_many"] += 1
            continue
        for path, name, old, new in changes:
            if max(len(old), len(new)) > settings.max_chars:
                counts["too_long"] += 1
                continue
            rows.append({"prompt": _prompt(message, path, name, old if settings.context else None),
                         "chosen": new, "rejected": old, "commit": sha, "file": path,
                         "function": name, "source": f"{sha[:12]} {path}:{name}"})
    counts["pairs"] = len(rows)
    return rows, counts


def _prompt(message: str, path: str, name: str, old: str | None) -> str:
    request = (f"Change `{name}` in {path} as this commit message asks:\n\n{message}\n\n"
               "Reply with the whole new function.")
    return request if old is None else f"{request}\n\nThe function now:\n\n{old}"


def run_commits(repo: str, output: str, settings: CommitSettings = CommitSettings(),
                overwrite: bool = False) -> Path:
    """Write the pairs of ``repo``'s history to ``output`` (JSONL). Returns the file."""
    root, target = Path(repo), Path(output)
    try:  # a clone's folder, or a bare (mirror) clone: its history is all that is read
        inside = "true" in (git(root, "rev-parse", "--is-inside-work-tree",
                                "--is-bare-repository").split())
    except DataError:
        inside = False
    if not inside:
        raise DataError(f"--repo {repo} is not a git repository; give the folder of a clone "
                        "(with its history: not a shallow one).")
    if git(root, "rev-parse", "--is-shallow-repository").strip() == "true":
        raise DataError(f"--repo {repo} is a shallow clone: its commits have no parents to "
                        "compare with; fetch its history (git -C REPO fetch --unshallow) or "
                        "clone it whole.")
    new_output_file(output, repo, overwrite)
    rows, counts = commit_pairs(root, settings)
    passed = ", ".join(f"{counts[key]} {why}" for key, why in (
        ("short_message", f"with messages under {settings.min_words} words"),
        ("no_function", "changing no Python function"),
        ("too_many", f"changing more than {settings.max_functions} functions"),
        ("too_long", f"functions over {settings.max_chars} characters")) if counts[key])
    if not rows:  # (an empty file was written, exit 0)
        raise DataError(f"--repo {repo}: no code pair in {counts['commits']} commits"
                        + (f" (passed over: {passed})" if passed else "")
                        + f"; nothing was written to {target}. See --max-commits, --min-words, "
                        "--max-functions and --max-chars.")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_rows(target, rows)
    print(f"{counts['pairs']} code pairs from {counts['commits']} commits of {repo}"
          + (f" (passed over: {passed})" if passed else "") + f": {target}")
    return target
