"""RankDPO on ranked image lists: the loss against a hand computation of its formula (values
and a gradient), lists of different lengths batched together equal each list alone, the data
errors name the record and field, and ``preftune diffusion rank`` writes lists whose scores
are the scorers' win shares, which ``preftune diffusion train`` then trains on."""

import json
import math
import random

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402

from diffusion_fixtures import (assert_same_gradient, config_tree, hand_error,  # noqa: E402
                                one_thread, tiny_pipeline)  # noqa: F401
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.data.records import DataError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.ranked import load_ranked  # noqa: E402
from preftune.diffusion.ranking import list_members, make_ranked_lists, win_shares  # noqa: E402
from preftune.diffusion.shapes import COLOURS, draw_shape, prompt_of  # noqa: E402
from preftune.diffusion.train import diffusion_task  # noqa: E402

LISTS = [  # (prompt colour, image colours, scores): lengths 3, 4 and 2; a tie in the second
    ("red", ["red", "blue", "green"], [1.0, 0.25, 0.5]),
    ("blue", ["green", "blue", "yellow", "red"], [0.0, 1.0, 0.5, 0.5]),
    ("green", ["yellow", "green"], [0.2, 0.9]),
]


def write_ranked(directory, lists=LISTS, extra=()):
    rng = random.Random(0)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (colour, colours, scores) in enumerate(lists):
        files = []
        for j, paint in enumerate(colours):
            files.append(f"images/{k}_{j}.png")
            draw_shape(paint, "circle", 16, rng).save(directory / files[-1])
        rows.append({"prompt": prompt_of(colour, "circle"), "images": files,
                     "image_scores": scores})
    path = directory / "ranked.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, *extra]))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranked")
    return tiny_pipeline(root / "pipe"), write_ranked(root / "data"), root


def make_task(pipe, data, tmp_path, beta=200.0, **sections):
    tree = config_tree(pipe, data, tmp_path / "run",
                       objective={"name": "rank_dpo", "beta": beta}, **sections)
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # policy != reference, so both terms of each reward matter
        for parameter in task.module.denoiser.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return task


def rank_dpo_by_hand(rewards, scores):
    """-sum over psi_i > psi_j of |2^psi_i - 2^psi_j| |1/log2(1+tau_i) - 1/log2(1+tau_j)|
    log sigma(r_i - r_j), tau the 1-based rank by reward (no reward ties here)."""
    order = sorted(range(len(rewards)), key=lambda k: -rewards[k].item())
    tau = {k: position + 1 for position, k in enumerate(order)}
    total = rewards.new_zeros(())
    for i in range(len(rewards)):
        for j in range(len(rewards)):
            if scores[i] > scores[j]:
                weight = (abs(2 ** scores[i] - 2 ** scores[j])
                          * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j])))
                total = total - weight * torch.log(torch.sigmoid(rewards[i] - rewards[j]))
    return total


def test_rank_dpo_matches_its_formula_on_lists_of_different_lengths(files, tmp_path):
    pipe, data, root = files
    task = make_task(pipe, data, tmp_path)
    model, weight = task.module, task.module.denoiser.conv_in.weight
    batch = task.make_batch(task.train_examples)
    assert batch.scores.shape == (3, 4) and batch.present.sum().item() == 9
    noise = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    timesteps = torch.tensor([10, 500, 990])
    losses, metrics = task.losses_with(model, batch, noise, timesteps)

    expected, rewards_all, agree, ordered = [], [], 0, 0
    for e, ranked in enumerate(task.train_examples):
        k = len(ranked.images)
        args = ([f"{ranked.base_dir}/{image}" for image in ranked.images], [ranked.prompt] * k,
                noise[e].expand(k, -1, -1, -1), timesteps[e].repeat(k))
        policy = hand_error(model.denoiser, model, *args)
        with torch.no_grad():
            reference = hand_error(task.reference, model, *args)
        rewards = -100.0 * (policy - reference)
        expected.append(rank_dpo_by_hand(rewards, ranked.image_scores))
        rewards_all.append(rewards.detach())
        for i in range(k):
            for j in range(k):
                if ranked.image_scores[i] > ranked.image_scores[j]:
                    ordered += 1
                    agree += int(rewards[i] > rewards[j])
    expected = torch.stack(expected)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-6)
    assert_same_gradient(losses, expected, weight)

    assert ordered == 3 + 5 + 1  # the tied pair (0.5, 0.5) of list 2 is no pair
    assert metrics["rewards/accuracies"][0].item() == agree
    assert metrics["rewards/accuracies"][1].item() == ordered
    best = [r[s.index(max(s))] for r, s in zip(rewards_all, (x.image_scores for x in
                                                              task.train_examples))]
    torch.testing.assert_close(metrics["rewards/chosen"][0], torch.stack(best).sum(),
                               rtol=1e-4, atol=1e-4)
    assert metrics["denoise/policy"][1].item() == 9


def test_each_list_alone_gives_the_batched_loss(files, tmp_path):
    """Flattening lists of 3, 4 and 2 images into one batch (padding the score grid) changes
    nothing: each list's loss equals its loss in a batch of its own."""
    pipe, data, _ = files
    task = make_task(pipe, data, tmp_path)
    together, _ = task.losses(task.module, task.make_batch(task.train_examples), step=5)
    alone = torch.cat([task.losses(task.module, task.make_batch([ranked]), step=5)[0]
                       for ranked in task.train_examples])
    # (other batch mates, other kernel blocking: ~1e-5 relative on some CPUs)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-7)
    assert (together > 0).all()


def test_win_shares_count_ties_as_half():
    assert win_shares([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert win_shares([1.0, 1.0, 0.0]) == [0.75, 0.75, 0.0]
    assert win_shares([7.0]) == [0.5]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "images": ["images/0_0.png"], "image_scores": [1]},
     "field 'images' (images) must be a list of at least 2 images"),
    ({"prompt": "p", "images": ["images/0_0.png", "images/0_1.png"], "image_scores": [1]},
     "field 'image_scores' (image_scores) must be a list of 2 numbers"),
    ({"prompt": "p", "images": ["images/0_0.png", "images/0_1.png"],
      "image_scores": [1, 100]}, "holds 100 at position 1"),
    ({"prompt": "p", "images": ["images/0_0.png", "nowhere.png"], "image_scores": [1, 0]},
     "image 1: cannot read it (FileNotFoundError"),
    ({"prompt": "p", "chosen": "images/0_0.png", "rejected": "images/0_1.png"},
     "pairs train diffusion_dpo"),
])
def test_bad_lists_name_the_record_and_field(tmp_path, row, message):
    data = write_ranked(tmp_path, extra=[row])
    with pytest.raises(DataError) as error:
        load_ranked(str(data))
    assert str(error.value).startswith(f"{data}:4: ")
    assert message in str(error.value)


def test_a_pair_objective_on_ranked_lists_says_which_objective_reads_them(files, tmp_path):
    pipe, data, _ = files
    tree = config_tree(pipe, data, tmp_path / "run", objective={"name": "diffusion_dpo"})
    with pytest.raises(DataError, match="ranked list of images: train it with objective "
                       "rank_dpo"):
        diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())


def test_lists_that_tie_every_image_are_left_out_and_counted(files, tmp_path):
    pipe, _, _ = files
    tied = ("red", ["red", "blue"], [0.5, 0.5])
    data = write_ranked(tmp_path / "data", [*LISTS, tied])
    task = make_task(pipe, data, tmp_path)
    assert [r.prompt for r in task.train_examples] == [prompt_of(c, "circle")
                                                      for c, _, _ in LISTS]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["shape"] == "ranked image lists"
    assert report["train"] == {"records": 4, "kept": 3}


def brightness(prompt, image):
    """A ``module:function`` image scorer for the test: the mean pixel value."""
    return float(np.asarray(image.convert("L"), dtype=np.float64).mean())


def test_rank_command_writes_win_share_lists_that_rank_dpo_trains_on(files, tmp_path, capsys):
    pipe, _, root = files
    other = tiny_pipeline(root / "other", seed=1)
    out = tmp_path / "syn"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": prompt_of(c, "square")}) + "\n"
                               for c in list(COLOURS)[:2]))
    main(["diffusion", "rank", "--model", str(pipe), "--model", str(other), "--prompts",
          str(prompts), "--prompt-field", "text", "--prompt", "a red circle", "--seeds", "0,1,2,3",
          "--list-size", "2", "--steps", "2", "--scorer", "shape_colour", "--scorer",
          "test_diffusion_ranked:brightness", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    lists = [json.loads(line) for line in (out / "ranked.jsonl").read_text().splitlines()]
    # 3 prompts x 2 groups of 2 seeds; each list holds both models' image of its seeds
    assert len(lists) == 6 and f"wrote 6 ranked lists of 24 images to {out}" in printed
    assert [len(x["images"]) for x in lists] == [4] * 6
    assert [s["seed"] for s in lists[1]["sources"]] == [2, 3, 2, 3]
    # --prompt first, then the file's prompts
    assert [x["prompt"] for x in lists[::2]] == ["a red circle", *(prompt_of(c, "square")
                                                                   for c in list(COLOURS)[:2])]
    for ranked in lists:
        raw = ranked["scorer_scores"]
        by_hand = [(a + b) / 2 for a, b in zip(win_shares(raw["shape_colour"]),
                                                win_shares(raw["test_diffusion_ranked:brightness"]))]
        assert ranked["image_scores"] == pytest.approx(by_hand, abs=1e-6)
        assert all((out / image).is_file() for image in ranked["images"])
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    ordering = [x for x in lists if len(set(x["image_scores"])) > 1]
    assert len(pairs) == len(ordering)
    for pair, ranked in zip(pairs, ordering):
        scores = ranked["image_scores"]
        assert pair["chosen"] == ranked["images"][scores.index(max(scores))]
        assert pair["rejected"] == ranked["images"][scores.index(min(scores))]

    again = ["diffusion", "rank", "--model", str(pipe), "--prompt", "a red circle", "--seeds",
             "0,1", "--steps", "1", "--scorer", "shape_colour", "--output-dir", str(out)]
    assert main(again) == 2  # the lists written above are not replaced silently
    assert f"{out} already holds ranked lists" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-prompts.jsonl")  # a bad --prompts moves nothing aside
    assert main(again + ["--overwrite", "--prompts", missing]) == 2
    assert missing in capsys.readouterr().err and not list(tmp_path.glob("syn.old-*"))
    main(again + ["--overwrite"])
    assert len([json.loads(line) for line in (out / "ranked.jsonl").open()]) == 1
    (aside,) = tmp_path.glob("syn.old-*")  # moved aside, not deleted
    assert len((aside / "ranked.jsonl").read_text().splitlines()) == 6
    out = aside

    tree = config_tree(pipe, out / "ranked.jsonl", tmp_path / "run",
                       objective={"name": "rank_dpo"}, train={"log_every": 1})
    config = tmp_path / "rank_dpo.yaml"
    config.write_text(json.dumps(tree))
    main(["diffusion", "train", str(config)])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [row["step"] for row in logged if "rewards/accuracies" in row] == [1, 2]
    assert (tmp_path / "run" / "model" / "unet" / "config.json").is_file()


def test_data_inspect_shows_a_list_best_first(files, capsys):
    _, data, _ = files
    main(["data", "inspect", str(data), "--example", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"{data}: 3 ranked image lists (prompt, images, image_scores) of 2, 3, "
                        "4 images; every image opened and readable")
    assert lines[-4:] == ["  score 1        images/1_1.png (16x16)",
                          "  score 0.5      images/1_2.png (16x16)",
                          "  score 0.5      images/1_3.png (16x16)",
                          "  score 0        images/1_0.png (16x16)"]


@pytest.mark.parametrize("how, expected", [
    ("pairs:best_vs_worst", [(0, 0, 1), (1, 1, 0), (2, 1, 0)]),
    ("pairs:all_pairs", [(0, 0, 1), (0, 0, 2), (0, 2, 1), (1, 1, 0), (1, 1, 2), (1, 1, 3),
                         (1, 2, 0), (1, 3, 0), (2, 1, 0)]),
])
def test_pair_objectives_read_ranked_lists_through_data_convert(files, tmp_path, how, expected):
    """(list, chosen image, rejected image) of every pair; the tied images 2 and 3 of list 1
    make no pair with each other. rank_dpo in the same config still reads the lists."""
    pipe, data, _ = files
    tree = config_tree(pipe, data, tmp_path / "run", objective={"name": "diffusion_dpo"},
                       data={"convert": how})
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    lists = load_ranked(str(data))
    got = []
    for pair in task.train_examples:
        e = next(k for k, r in enumerate(lists) if pair.origin.startswith(r.origin + " "))
        got.append((e, lists[e].images.index(pair.chosen), lists[e].images.index(pair.rejected)))
        assert pair.scores["chosen_score"] > pair.scores["rejected_score"]
    assert got == expected
    assert [p.index for p in task.train_examples] == list(range(len(expected)))
    tree["objective"] = {"name": "rank_dpo"}
    ranked_task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    assert len(ranked_task.train_examples) == 3


def test_data_convert_on_pairs_says_they_are_pairs_already(files, tmp_path):
    """(It said the records lacked a list of images, and pointed at rank_dpo and
    data.fields.images, for a diffusion_dpo run on ordinary pairs.)"""
    from diffusion_fixtures import write_pairs

    pipe, _, _ = files
    pairs = write_pairs(tmp_path / "pairs", count=2)
    tree = config_tree(pipe, pairs, tmp_path / "run", objective={"name": "diffusion_dpo"},
                       data={"convert": "pairs:best_vs_worst"})
    with pytest.raises(ConfigError, match=rf"data.convert: pairs:best_vs_worst turns ranked image "
                                          rf"lists into pairs, and {pairs} holds pairs already; "
                                          rf"remove data.convert"):
        diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())


def test_compare_trains_pair_and_ranked_objectives_from_one_config(files, tmp_path):
    pipe, data, _ = files
    tree = config_tree(pipe, data, tmp_path / "unused", data={"convert": "pairs:best_vs_worst"},
                       samples={"prompts": ["a red circle"], "seeds": [0], "steps": 2})
    config = tmp_path / "base.yaml"
    config.write_text(json.dumps(tree))
    main(["compare", "--objectives", "diffusion_dpo,rank_dpo", "--config", str(config),
          "--scorer", "shape_colour", "--output-dir", str(tmp_path / "cmp")])
    board = json.loads((tmp_path / "cmp" / "leaderboard.json").read_text())
    assert sorted(e["objective"] for e in board) == ["diffusion_dpo", "rank_dpo"]
    reports = {name: json.loads((tmp_path / "cmp" / name / "data_report.json").read_text())
               for name in ("diffusion_dpo", "rank_dpo")}
    assert reports["diffusion_dpo"]["shape"] == "image pairs"
    assert reports["diffusion_dpo"]["train"] == {"records": 3, "kept": 3}
    assert reports["rank_dpo"]["shape"] == "ranked image lists"



EVENTS = []  # what the rank below did, in order


def counted_brightness(prompt, image):
    EVENTS.append("scored")
    return brightness(prompt, image)


def test_rank_saves_and_scores_each_batch_before_sampling_the_next(files, tmp_path,
                                                                   monkeypatch):
    """With ``batch_size`` 3, the 8 images of 2 prompts x 4 seeds are sampled 3, 3 and 2 at a
    time, each batch scored and its files written before the next is sampled; the lists equal
    those of sampling everything in one batch."""
    import preftune.diffusion.ranking as ranking

    sampled, folder = ranking.image_batches, tmp_path / "b3" / "images"

    def watched(*args, **kwargs):
        for batch in sampled(*args, **kwargs):
            EVENTS.append((len(batch), len(list(folder.glob("*.png")))))  # (images, on disk)
            assert not batch.requires_grad and torch.is_grad_enabled()  # no graph kept; the
            yield batch  # caller's own grad mode between batches

    monkeypatch.setattr(ranking, "image_batches", watched)
    EVENTS.clear()
    prompts, seeds, scorer = ["a red circle", "a blue square"], [0, 1, 2, 3], \
        f"{__name__}:counted_brightness"
    ranking.make_ranked_lists(prompts, [str(pipe := files[0])], [scorer], seeds,
                              tmp_path / "b3", steps=2, batch_size=3)
    assert EVENTS == [(3, 0), *["scored"] * 3, (3, 3), *["scored"] * 3, (2, 6),
                      *["scored"] * 2]
    ranking.make_ranked_lists(prompts, [str(pipe)], [scorer], seeds, tmp_path / "all",
                              steps=2, batch_size=8)
    read = [[json.loads(line) for line in (tmp_path / name / "ranked.jsonl").open()]
            for name in ("b3", "all")]
    for a, b in zip(*read, strict=True):
        assert a["images"] == b["images"]
        # (the same images up to 1e-4, saved as 8-bit pixels)
        assert a["scorer_scores"][scorer] == pytest.approx(b["scorer_scores"][scorer], abs=0.05)


def test_no_list_holds_a_single_image():
    """A last group of one seed joins the one before (one image orders nothing); with two
    models a group of one seed holds two images and stays."""
    one_model = list_members(["p"], ["m"], [0, 1, 2], 2)
    assert one_model == [(0, [(0, 0), (0, 1), (0, 2)])]
    two_models = list_members(["p"], ["a", "b"], [0, 1, 2], 2)
    assert two_models == [(0, [(0, 0), (0, 1), (1, 0), (1, 1)]), (0, [(0, 2), (1, 2)])]
    with pytest.raises(ConfigError, match=r"make lists of one image, which order nothing"):
        make_ranked_lists(["p"], ["m"], ["shape_colour"], [0, 1], "unused", list_size=1)
