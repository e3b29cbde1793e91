"""Step-level preference pairs from a best-first search tree, after Tree-PLV (He et al.,
"Advancing Process Verification for Large Language Models via Tree-Based Preference Learning",
arXiv:2407.00390).

A policy answers step by step (a step ends at ``delimiter``, a line by default). For each
prompt a tree grows from the empty answer: expanding a node samples ``branches`` next steps,
and each child's value is the share of ``rollouts`` completions from it that the scorer passes
(its mean score; a child that ends the answer is scored once, as it is). The next node expanded
is the unexpanded one of highest value anywhere in the tree (best first), ``expansions`` times
per prompt. Sibling steps whose values differ by at least ``min_gap`` make a pair:

    prompt   = the question
    chosen   = the answer so far + the better step      rejected = ... + the worse step

so a reward model trained on them (``preftune rm train``, the Bradley-Terry loss
-log sigmoid(V(chosen) - V(rejected)), Tree-PLV's step-level ranking loss) scores partial
answers, and scores a whole answer by its last step, as Tree-PLV reranks best-of-N. (A
partial answer is a whole assistant turn here, as finished answers are when the verifier
scores them; a policy trained on these pairs would learn to stop after a step.)

Prompts are expanded together, one node each per wave, so generation runs in batches. Each
child keeps its rollouts and their scores in ``trees.jsonl``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..generation import HFGenerator, SamplingSettings, prompt_ids
from ..score.base import score_samples
from ..train.logging import progress
from ..train.output import check_output_folder
from .records import DataError
from .rows import write_rows
from .turn_end import stop_ids

PAIR_FIELDS = ("chosen_value", "rejected_value", "depth")


@dataclass(frozen=True)
class TreeSettings:
    branches: int = 4  # next steps sampled per expansion
    rollouts: int = 4  # completions per step that estimate its value
    expansions: int = 4  # nodes expanded per prompt, best first
    delimiter: str = "\n"  # what ends a step
    step_tokens: int = 64  # longest step
    answer_tokens: int = 256  # longest completion of a rollout
    min_gap: float = 0.25  # the value gap a sibling pair needs
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16  # generation contexts per call

    def __post_init__(self):
        problems = [f"{name} {value!r}: {rule}" for name, value, ok, rule in (
            ("branches", self.branches, self.branches >= 2, "at least 2 (pairs are siblings)"),
            ("rollouts", self.rollouts, self.rollouts >= 1, "at least 1"),
            ("expansions", self.expansions, self.expansions >= 1, "at least 1"),
            ("step_tokens", self.step_tokens, self.step_tokens >= 1, "at least 1"),
            ("answer_tokens", self.answer_tokens, self.answer_tokens >= 1, "at least 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "at least 1"),
            ("delimiter", self.delimiter, bool(self.delimiter), "a non-empty string"),
            ("min_gap", self.min_gap, self.min_gap > 0, "above 0 (ties make no pair)"),
            ("temperature", self.temperature, self.temperature > 0,
             "above 0 (siblings must differ)"),
        ) if not ok]
        if problems:
            raise ValueError("tree search: " + "; ".join(problems) + ".")


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int
    step: str  # this node's step, with its delimiter when it has one
    answer: str  # the answer from the root through this step
    value: float | None = None
    terminal: bool = False  # the step ended the answer
    expanded_at: int | None = None  # the wave that expanded it
    rollouts: list[str] = field(default_factory=list)
    rollout_scores: list[float] = field(default_factory=list)


class Tree:
    """One prompt's search tree: its nodes, and the pairs made of siblings."""

    def __init__(self, origin: str, prompt, question, prompt_ids: list[int]):
        self.origin, self.prompt, self.question, self.prompt_ids = \
            origin, prompt, question, prompt_ids
        self.nodes = [Node(0, None, 0, "", "")]
        self.pairs: list[tuple[int, int]] = []

    def best_open(self) -> Node | None:
        """The unexpanded, unfinished node of highest value (the root first; ties: the
        earlier node)."""
        open_ = [n for n in self.nodes if n.expanded_at is None and not n.terminal]
        return max(open_, key=lambda n: (n.value if n.value is not None else float("inf"),
                                         -n.id), default=None)

    def add_child(self, parent: Node, step: str, terminal: bool) -> Node:
        node = Node(len(self.nodes), parent.id, parent.depth + 1, step, parent.answer + step,
                    terminal=terminal)
        self.nodes.append(node)
        return node

    def pair_children(self, parent: Node, min_gap: float) -> None:
        """Every (better, worse) pair of ``parent``'s children whose values differ by at least
        ``min_gap``; the same step sampled twice, valued apart by its random rollouts, is no
        pair (chosen would be rejected)."""
        children = [n for n in self.nodes if n.parent == parent.id]
        self.pairs += [(a.id, b.id) for a in children for b in children
                       if a.value - b.value >= min_gap and a.step != b.step]


def search(model, tokenizer, trees: list[Tree], scorer, settings: TreeSettings) -> dict:
    """Grow every tree ``settings.expansions`` times (best first); returns counts."""
    generator = HFGenerator(model, tokenizer)
    counts = {"expansions": 0, "children": 0, "blank_steps": 0, "rollouts": 0}
    with progress("tree search", settings.expansions * len(trees), "expansion") as update:
        for wave in range(settings.expansions):
            picks = [(tree, tree.best_open()) for tree in trees]
            picks = [(tree, node) for tree, node in picks if node is not None]
            if not picks:
                break
            children = _expand(generator, tokenizer, picks, settings, wave, counts)
            _value(generator, tokenizer, children, scorer, settings, wave, counts)
            for tree, node in picks:
                node.expanded_at = wave
                tree.pair_children(node, settings.min_gap)
            counts["expansions"] += len(picks)
            update(len(picks))
    return counts


def _context(tokenizer, tree: Tree, answer: str) -> list[int]:
    """The prompt's ids (as training renders it) and the answer so far."""
    return tree.prompt_ids + (tokenizer.encode(answer, add_special_tokens=False)
                              if answer else [])


def _expand(generator, tokenizer, picks: list, settings: TreeSettings, wave: int,
            counts: dict) -> list:
    """``branches`` next steps of each picked node, added to its tree; (tree, child) pairs."""
    step_settings = SamplingSettings(
        samples=settings.branches, temperature=settings.temperature,
        max_new_tokens=settings.step_tokens, stop=(settings.delimiter,),
        seed=settings.seed * 1000 + 2 * wave, batch_size=settings.batch_size)
    drawn = generator.generate([_context(tokenizer, tree, node.answer) for tree, node in picks],
                               step_settings)
    stops = stop_ids(tokenizer)
    children = []
    for (tree, node), ids_list, texts in zip(picks, drawn.token_ids, drawn.texts):
        for ids, text in zip(ids_list, texts):
            terminal = bool(ids) and ids[-1] in stops
            delimited = not terminal and settings.delimiter in tokenizer.decode(
                ids, skip_special_tokens=True)
            if not terminal and not text.strip():  # a blank line is not a step
                counts["blank_steps"] += 1
                continue
            step = text + (settings.delimiter if delimited else "")
            children.append((tree, tree.add_child(node, step, terminal)))
    counts["children"] += len(children)
    return children


def _value(generator, tokenizer, children: list, scorer, settings: TreeSettings, wave: int,
           counts: dict) -> None:
    """Each child's value: its rollouts' mean score, or its own score when it ends the
    answer."""
    open_ = [(tree, node) for tree, node in children if not node.terminal]
    if open_:
        rollout_settings = SamplingSettings(
            samples=settings.rollouts, temperature=settings.temperature,
            max_new_tokens=settings.answer_tokens, seed=settings.seed * 1000 + 2 * wave + 1,
            batch_size=settings.batch_size)
        drawn = generator.generate([_context(tokenizer, tree, node.answer)
                                    for tree, node in open_], rollout_settings).texts
        for (tree, node), texts in zip(open_, drawn):
            node.rollouts = [node.answer + text for text in texts]
        counts["rollouts"] += settings.rollouts * len(open_)
    texts = [node.rollouts or [node.answer] for _, node in children]
    groups = score_samples(scorer, [tree.question for tree, _ in children], texts)
    for (_, node), scores in zip(children, groups):
        node.rollout_scores = scores if node.rollouts else []
        node.value = statistics.fmean(scores)


def pair_rows(trees: list[Tree]) -> list[dict]:
    """The pairs of every tree as training rows (the prompt's format: an assistant turn after
    a chat prompt)."""
    rows = []
    for tree in trees:
        for better, worse in tree.pairs:
            a, b = tree.nodes[better], tree.nodes[worse]
            rows.append({"prompt": tree.prompt, "chosen": _reply(tree.prompt, a.answer),
                         "rejected": _reply(tree.prompt, b.answer), "chosen_value": a.value,
                         "rejected_value": b.value, "depth": a.depth,
                         "source": f"{tree.origin} node {a.parent} [{a.id}>{b.id}]"})
    return rows


def tree_rows(trees: list[Tree], settings: TreeSettings) -> list[dict]:
    """One row per prompt: its nodes (step, value, rollouts and their scores) and settings."""
    return [{"origin": tree.origin, "prompt": tree.prompt, "settings": asdict(settings),
             "nodes": [asdict(node) for node in tree.nodes]} for tree in trees]


def run_tree(model: str, data: str, output_dir: str, scorer: str,
             settings: TreeSettings = TreeSettings(), *, fields: dict | None = None,
             max_length: int = 1024, max_prompt_length: int | None = None,
             dtype: str = "float32", chat_template: str | None = None,
             overwrite: bool = False) -> Path:
    """Search a tree for every distinct prompt of ``data`` with ``model``, valued by
    ``scorer``, and write ``pairs.jsonl`` and ``trees.jsonl`` to ``output_dir``. The scorer,
    the prompts and the output are checked before the model loads. Returns the pairs file."""
    from accelerate import PartialState

    from ..model.load import given_as, load_model_and_tokenizer
    from ..online.common import read_prompts
    from ..score import check_scorer, load_scorer
    from .tokenize import TokenizeSettings

    out = Path(output_dir)
    check_output_folder(out, "--output-dir")
    written = [out / name for name in ("pairs.jsonl", "trees.jsonl")]
    if any(path.resolve() == Path(data).resolve() for path in written):
        raise DataError(f"--output-dir {out}: its {Path(data).name} would replace --data "
                        f"{data}, the file the search reads; choose another --output-dir.")
    taken = [path for path in written if path.exists()]
    if taken and not overwrite:
        raise DataError(f"{taken[0]} already exists; choose another --output-dir, or pass "
                        "--overwrite to replace it.")
    try:
        check_scorer(scorer, data)
    except ConfigError as error:
        raise ConfigError(f"--scorer: {error}") from None
    prompts = read_prompts(data, fields or {}, "the tree search answers each row's prompt",
                           "--column prompt=NAME")
    if not prompts:
        raise DataError(f"{data} holds no records; give a file of prompts.")
    shown = next((p for p in prompts if p.images), None)
    if shown is not None:
        raise DataError(f"{shown.origin}: the tree search samples text; prompts with images "
                        "are not taken here.")
    judge = load_scorer(scorer, data)
    if getattr(judge, "pairwise", False):
        raise ConfigError(f"--scorer {scorer} compares two answers; a step's value is the mean "
                          "score of its rollouts, so give a pointwise scorer (a verifier, "
                          "synthetic, rm:DIR, judge:MODEL).")
    with given_as("--model"):
        policy, tokenizer = load_model_and_tokenizer(model, dtype, chat_template=chat_template,
                                                     device=PartialState().device)
    ids = prompt_ids([p.prompt for p in prompts], tokenizer,
                     TokenizeSettings(max_length, max_prompt_length),
                     tools=[p.tools for p in prompts])
    trees = [Tree(p.origin, p.prompt, p.question, rendered) for p, rendered in zip(prompts, ids)]
    counts = search(policy, tokenizer, trees, judge, settings)
    rows = pair_rows(trees)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "trees.jsonl", tree_rows(trees, settings))
    if not rows:  # (an empty pairs file was written, exit 0)
        stale = out / "pairs.jsonl"  # an earlier search's, beside these trees (--overwrite)
        removed = stale.exists()
        stale.unlink(missing_ok=True)
        raise DataError(f"tree search over {len(trees)} prompts: no sibling steps' values "
                        f"differ by --min-gap {settings.min_gap} (of {counts['children']} steps "
                        f"valued by {counts['rollouts']} rollouts), so no pair; no pairs.jsonl "
                        "was written" + (" (the earlier one, of other trees, was removed)"
                                         if removed else "")
                        + f". Each step's value is in {out / 'trees.jsonl'}: lower "
                        "--min-gap, or give more --branches or --rollouts.")
    write_rows(out / "pairs.jsonl", rows)
    print(f"tree search over {len(trees)} prompts: {counts['expansions']} expansions, "
          f"{counts['children']} steps valued by {counts['rollouts']} rollouts "
          f"({counts['blank_steps']} blank steps passed over): {len(rows)} step pairs with a "
          f"value gap of at least {settings.min_gap} in {out / 'pairs.jsonl'}; the trees in "
          f"{out / 'trees.jsonl'}")
    return out / "pairs.jsonl"


def _reply(prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
