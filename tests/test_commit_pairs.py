"""``preftune data commits`` (CodeFavor's Commit-Instruct) on a repository made here: which
commits give pairs, and each pair's before and after code."""

import json
import subprocess
import textwrap

import pytest

from preftune.cli import main
from preftune.data.commits import changed_functions

FIRST = textwrap.dedent('''\
    def f(x):
        return x + 1


    def g(y):
        return y * 2


    class C:
        def m(self, items):
            total = 0
            for item in items:
                total += item
            return total
    ''')


def commit(repo, message, text):
    (repo / "a.py").write_text(text)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "-m", message], check=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    commit(root, "Add the first functions", FIRST)
    handled = FIRST.replace("    return x + 1", "    if x < 0:\n        return 0\n    return x + 1")
    shas = {"negative": commit(root, "Make f treat negative numbers as zero", handled)}
    tripled = handled.replace("y * 2", "y * 3")
    commit(root, "fix", tripled)  # too short a message
    reformatted = tripled.replace("y * 3", "(y)*3  # triple")
    commit(root, "Only reformat g and add a comment", reformatted)  # no change of code
    renamed = reformatted.replace("x + 1", "x + 2").replace("(y)*3", "y * 4").replace(
        "total = 0", "total = 1").replace("return 0", "return -1")
    (root / "b.py").write_text("def h():\n    return 1\n")
    commit(root, "Change every constant across the whole module", renamed)  # f, g and C.m
    early = renamed.replace("        total = 1\n", "        if not items:\n            return 0\n"
                            "        total = 1\n")
    shas["early"] = commit(root, "Return early from C.m when there are no items", early)
    (root / "notes.txt").write_text("a long note about nothing in particular\n")
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "-m", "Write a note that is not code at all"], check=True)
    return root, shas, handled, renamed, early


def test_each_commit_gives_its_changed_functions_after_over_before(repo, tmp_path, capsys):
    root, shas, handled, renamed, early = repo
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "commits", "--repo", str(root), "--output", str(out),
                 "--max-functions", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["commit"], r["function"]) for r in rows] == [(shas["early"], "C.m"),
                                                           (shas["negative"], "f")]
    method = rows[0]
    assert method["rejected"] == textwrap.indent(
        "def m(self, items):\n    total = 1\n    for item in items:\n        total += item\n"
        "    return total", "    ")
    assert method["chosen"] == textwrap.indent(
        "def m(self, items):\n    if not items:\n        return 0\n    total = 1\n"
        "    for item in items:\n        total += item\n    return total", "    ")
    f = rows[1]
    assert (f["rejected"], f["chosen"]) == (
        "def f(x):\n    return x + 1", "def f(x):\n    if x < 0:\n        return 0\n"
                                       "    return x + 1")
    assert "Make f treat negative numbers as zero" in f["prompt"]
    assert f["prompt"].endswith("The function now:\n\ndef f(x):\n    return x + 1")
    assert f["source"] == f"{shas['negative'][:12]} a.py:f"
    said = capsys.readouterr().out
    assert said.startswith(f"2 code pairs from 7 commits of {root} (passed over: 1 with "
                           "messages under 3 words, 3 changing no Python function, 1 changing "
                           "more than 2 functions)")


def test_formatting_and_comments_are_not_a_change_and_broken_modules_give_nothing():
    before = "def g(y):\n    return y * 2\n"
    assert changed_functions(before, "def g(y):\n    return (y)*2  # double\n") == []
    assert changed_functions(before, "def g(y):\n    return y * 3\n") == [
        ("g", "def g(y):\n    return y * 2", "def g(y):\n    return y * 3")]
    assert changed_functions(before, "def g(y:\n") == []


def test_decorators_blocks_and_a_redefined_name_are_each_a_function():
    """A decorator's change gave a pair whose two sides were the same text (the source began
    at `def`); functions under try/if blocks were never read; a property's setter hid its
    getter (one key for both)."""
    before = textwrap.dedent('''\
        def fib(n):
            return n


        class C:
            @property
            def x(self):
                return 1

            @x.setter
            def x(self, v):
                self._x = v


        try:
            from fast import parse
        except ImportError:
            def parse(text):
                return text.split()
        ''')
    after = (before.replace("def fib", "@functools.cache\ndef fib")
             .replace("return 1", "return 2").replace("text.split()", "text.split(',')"))
    assert changed_functions(before, after) == [
        ("fib", "def fib(n):\n    return n", "@functools.cache\ndef fib(n):\n    return n"),
        ("C.x", "    @property\n    def x(self):\n        return 1",
         "    @property\n    def x(self):\n        return 2"),
        ("parse", "    def parse(text):\n        return text.split()",
         "    def parse(text):\n        return text.split(',')")]
    setter = after.replace("self._x = v", "self._x = int(v)")
    assert [name for name, *_ in changed_functions(after, setter)] == ["C.x (2)"]


def test_non_ascii_file_names_and_bare_clones_are_read(tmp_path, capsys):
    """git quoted a name such as café.py ("caf\\303\\251.py"), so its changes were passed
    over; a bare (mirror) clone was called no git repository."""
    root = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for message, body in (("Add the first version of f", "return 1"),
                          ("Make f return two instead of one", "return 2")):
        (root / "café.py").write_text(f"def f():\n    {body}\n")
        subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                        "commit", "-q", "-m", message], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(root), str(bare)], check=True)
    for source in (root, bare):
        out = tmp_path / f"{source.name}.jsonl"
        assert main(["data", "commits", "--repo", str(source), "--output", str(out)]) == 0
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert (row["file"], row["rejected"], row["chosen"]) == (
            "café.py", "def f():\n    return 1", "def f():\n    return 2")


def test_bad_input_is_named(repo, tmp_path, capsys):
    root, *_ = repo
    existing = tmp_path / "taken.jsonl"
    existing.write_text("")
    shallow = tmp_path / "shallow"  # (it gave 0 pairs without a word)
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{root}", str(shallow)],
                   check=True)
    for args, says in (
            (["--repo", str(shallow), "--output", str(tmp_path / "x.jsonl")],
             f"--repo {shallow} is a shallow clone"),
            (["--repo", str(root), "--output", str(tmp_path / "x.jsonl"), "--min-words", "99"],
             "no code pair in "),  # (an empty file, exit 0)
            (["--repo", str(tmp_path), "--output", str(tmp_path / "x.jsonl")],
             f"--repo {tmp_path} is not a git repository"),
            (["--repo", str(root), "--output", str(existing)],
             f"--output {existing} already exists; choose another file, or pass --overwrite")):
        assert main(["data", "commits", *args]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
