"""``preftune data tree`` (Tree-PLV's step-level pairs) on a tiny model: every value is its
rollouts' mean score, every expansion picks the best open node, every pair is two siblings
far enough apart, and a reward model trains on the pairs."""

import json
import statistics

import pytest

from preftune.cli import main
from preftune.data.tree import Tree, TreeSettings, run_tree
from tiny_models import save_tiny_model_dir

SCORER = "test_tree_pairs:lower_share"
SETTINGS = TreeSettings(branches=3, rollouts=3, expansions=3, delimiter=" ", step_tokens=4,
                        answer_tokens=6, min_gap=0.15, seed=5)


def lower_share(prompt, response):
    """The verifier: the share of lower-case letters in the answer."""
    return sum(c.islower() for c in response) / max(1, len(response))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    model = save_tiny_model_dir(root / "tiny", seed=3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ["add 2 and 3", "name a fruit", "add 2 and 3"]))
    out = root / "out"
    pairs = run_tree(str(model), str(prompts), str(out), SCORER, SETTINGS, max_length=64,
                     max_prompt_length=32)
    return root, model, prompts, out, pairs


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_values_are_the_mean_score_of_the_rollouts(workspace):
    _, _, prompts, out, _ = workspace
    trees = read_jsonl(out / "trees.jsonl")
    assert [t["origin"] for t in trees] == [f"{prompts}:1", f"{prompts}:2"]  # distinct prompts
    for tree in trees:
        nodes = tree["nodes"]
        assert nodes[0]["answer"] == "" and nodes[0]["value"] is None
        for node in nodes[1:]:
            parent = nodes[node["parent"]]
            assert node["answer"] == parent["answer"] + node["step"]
            assert node["depth"] == parent["depth"] + 1
            if node["terminal"]:  # the answer ended: scored as it is
                assert node["rollouts"] == [] and node["value"] == lower_share(
                    None, node["answer"])
                continue
            assert len(node["rollouts"]) == 3
            assert all(r.startswith(node["answer"]) for r in node["rollouts"])
            scores = [lower_share(None, r) for r in node["rollouts"]]
            assert node["rollout_scores"] == scores
            assert node["value"] == pytest.approx(statistics.fmean(scores))
            # a step ends at its delimiter (kept), or without one at step_tokens (a character
            # a token here)
            step = node["step"]
            assert (step.endswith(" ") and " " not in step[:-1]) or (
                " " not in step and len(step) <= 4), step


def test_each_wave_expands_the_best_open_node(workspace):
    _, _, _, out, _ = workspace
    for tree in read_jsonl(out / "trees.jsonl"):
        nodes = tree["nodes"]
        waves = sorted({n["expanded_at"] for n in nodes if n["expanded_at"] is not None})
        assert waves == list(range(len(waves))) and len(waves) >= 2
        for wave in waves:
            (picked,) = [n for n in nodes if n["expanded_at"] == wave]
            if wave == 0:
                assert picked["id"] == 0  # the root first
                continue
            # open then: made by an earlier wave, not expanded before this one, not terminal
            made = {n["id"] for n in nodes if n["parent"] is not None and
                    nodes[n["parent"]]["expanded_at"] < wave}
            open_ = [n for n in nodes if n["id"] in made and not n["terminal"] and
                     (n["expanded_at"] is None or n["expanded_at"] >= wave)]
            best = max(open_, key=lambda n: (n["value"], -n["id"]))
            assert picked["id"] == best["id"]


def test_pairs_are_siblings_whose_values_differ_by_the_gap(workspace):
    _, _, _, out, pairs = workspace
    rows = read_jsonl(pairs)
    expected = []
    for tree in read_jsonl(out / "trees.jsonl"):
        nodes = tree["nodes"]
        for parent in (n for n in nodes if n["expanded_at"] is not None):
            children = [n for n in nodes if n["parent"] == parent["id"]]
            expected += [(tree["prompt"], a["answer"], b["answer"], a["value"], b["value"],
                          f"{tree['origin']} node {parent['id']} [{a['id']}>{b['id']}]")
                         for a in children for b in children if a["value"] - b["value"] >= 0.15]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["chosen_value"], r["rejected_value"],
             r["source"]) for r in rows] == expected
    assert len(rows) >= 3


def test_the_same_seed_grows_the_same_trees_and_a_reward_model_trains_on_the_pairs(
        workspace, tmp_path):
    root, model, prompts, out, _ = workspace
    again = run_tree(str(model), str(prompts), str(tmp_path / "again"), SCORER, SETTINGS,
                     max_length=64, max_prompt_length=32)
    assert again.read_text() == (out / "pairs.jsonl").read_text()
    config = tmp_path / "rm.yaml"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "rm"), "model": {"path": str(model)},
        "data": {"train": str(out / "pairs.jsonl"), "max_length": 64},
        "loss": {"name": "bt"}, "train": {"batch_size": 2, "max_steps": 2}}))
    main(["rm", "train", str(config)])
    metrics = read_jsonl(tmp_path / "rm" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]


def test_the_command_line_refuses_bad_input_before_the_model_loads(workspace, tmp_path,
                                                                   capsys):
    root, model, prompts, out, _ = workspace
    base = ["data", "tree", "--model", str(model), "--data", str(prompts), "--scorer", SCORER]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "where is the prompt"}\n')
    own = tmp_path / "own" / "pairs.jsonl"  # prompts in a file the output would replace
    own.parent.mkdir()
    own.write_text(prompts.read_text())
    for args, says in (
            (base + ["--output-dir", str(bad)], f"--output-dir {bad} is a file"),
            (base[:4] + ["--data", str(own), "--scorer", SCORER, "--output-dir",
                         str(own.parent), "--overwrite"],
             "its pairs.jsonl would replace --data"),
            (base + ["--output-dir", str(out)], "pairs.jsonl already exists; choose another "
                                                "--output-dir, or pass --overwrite"),
            (base + ["--output-dir", str(tmp_path / "x"), "--branches", "1"],
             "branches 1: at least 2 (pairs are siblings)"),
            (base[:-1] + ["no_such_module:f", "--output-dir", str(tmp_path / "x")],
             "error: --scorer: "),
            (base[:4] + ["--data", str(bad), "--scorer", SCORER, "--output-dir",
                         str(tmp_path / "x")],
             "bad.jsonl:2: field 'prompt' (the prompt) is missing or empty; the tree search")):
        assert main(args) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and own.read_text() == prompts.read_text()


def test_a_tree_pairs_every_far_enough_sibling_pair_of_an_expanded_node():
    tree = Tree("f:1", "q", "q", [1])
    root = tree.nodes[0]
    values = [0.9, 0.5, 0.8, 0.5]
    for k, value in enumerate(values):
        tree.add_child(root, f"s{k} ", terminal=False).value = value
    tree.pair_children(root, 0.3)
    assert tree.pairs == [(1, 2), (1, 4), (3, 2), (3, 4)]
    # the same step drawn twice, valued apart by its rollouts: no pair of it with itself
    twice = Tree("f:2", "q", "q", [1])
    for step, value in (("Y ", 0.9), ("Y ", 0.1), ("Z ", 0.1)):
        twice.add_child(twice.nodes[0], step, terminal=False).value = value
    twice.pair_children(twice.nodes[0], 0.3)
    assert twice.pairs == [(1, 3)]
    assert tree.best_open().id == 0  # the root, until expanded
    root.expanded_at = 0
    assert tree.best_open().id == 1
    tree.nodes[1].terminal = True
    assert tree.best_open().id == 3


def test_steps_end_at_the_delimiter_or_the_answers_end_and_blank_steps_are_passed_over(
        monkeypatch):
    """A scripted generator: the step draws are "ab cd" (cut at the delimiter), "x" + EOS (the
    answer ends: scored as it is, no rollouts) and " q" (a blank step); each rollout is "zz"."""
    from preftune import generation
    from preftune.data import tree as tree_module
    from tiny_models import char_tokenizer

    tokenizer = char_tokenizer()
    eos = tokenizer.eos_token_id

    class Scripted:
        def __init__(self, model, tokenizer):
            pass

        def generate(self, contexts, settings, description=None, images=None):
            encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
            draws = ([encode("ab cd"), encode("x") + [eos], encode(" q")] if settings.stop
                     else [encode("zz")] * settings.samples)
            return generation.finished([draws for _ in contexts], settings, tokenizer, 0.0)

    class Scorer:
        pairwise = False

        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    monkeypatch.setattr(tree_module, "HFGenerator", Scripted)
    tree = Tree("f:1", "q", "q", tokenizer.encode("q", add_special_tokens=False))
    counts = tree_module.search(None, tokenizer, [tree], Scorer(), TreeSettings(
        branches=3, rollouts=2, expansions=2, delimiter=" ", min_gap=1.0))
    first = [n for n in tree.nodes if n.parent == 0]
    assert [(n.step, n.terminal) for n in first] == [("ab ", False), ("x", True)]
    assert first[0].rollouts == ["ab zz", "ab zz"] and first[0].value == 5.0
    assert first[1].rollouts == [] and first[1].value == 1.0
    assert tree.pairs[0] == (first[0].id, first[1].id)
    # wave 2 expands "ab " (the terminal "x" is never expanded): its children continue it
    second = [n for n in tree.nodes if n.parent == first[0].id]
    assert [n.answer for n in second] == ["ab ab ", "ab x"] and first[0].expanded_at == 1
    assert counts == {"expansions": 2, "children": 4, "blank_steps": 2, "rollouts": 4}


def constant(prompt, response):
    """A verifier that scores every answer alike: no step is better than its sibling."""
    return 1.0


def test_a_search_that_finds_no_pair_says_so_and_keeps_its_trees(workspace, tmp_path, capsys):
    """(It wrote an empty pairs.jsonl and exited 0.) The trees, each step's value in them,
    are kept: they say why."""
    root, model, prompts, _, _ = workspace
    out = tmp_path / "flat"
    assert main(["data", "tree", "--model", str(model), "--data", str(prompts), "--scorer",
                 "test_tree_pairs:constant", "--output-dir", str(out), "--branches", "2",
                 "--rollouts", "1", "--expansions", "1", "--max-length", "64"]) == 2
    err = capsys.readouterr().err
    assert "tree search over 2 prompts: no sibling steps' values differ by --min-gap 0.25" in err
    assert f"no pairs.jsonl was written. Each step's value is in {out / 'trees.jsonl'}" in err
    assert not (out / "pairs.jsonl").exists()
    assert len(read_jsonl(out / "trees.jsonl")) == 2  # (the repeated prompt grows one)
    # under --overwrite, an earlier search's pairs are not left beside these trees
    (out / "pairs.jsonl").write_text('{"prompt": "of other trees"}\n')
    assert main(["data", "tree", "--model", str(model), "--data", str(prompts), "--scorer",
                 "test_tree_pairs:constant", "--output-dir", str(out), "--branches", "2",
                 "--rollouts", "1", "--expansions", "1", "--max-length", "64",
                 "--overwrite"]) == 2
    assert "no pairs.jsonl was written (the earlier one, of other trees, was removed)" in \
        capsys.readouterr().err
    assert not (out / "pairs.jsonl").exists()


def test_escapes_of_the_delimiter_are_read_and_other_characters_kept():
    from preftune.data.cli import escapes_read

    assert [escapes_read(text) for text in ("\\n\\n", "。", "é\\t", "\\u3002", " ")] == [
        "\n\n", "。", "é\t", "。", " "]
