"""Reward models on tiny random backbones: the fast forward equals plain per-response forwards,
saved models reload and score identically (also through AutoModelForSequenceClassification),
training learns a known preference, and bad input is named."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.cli import main
from preftune.config import ConfigError
from preftune.data.layout import LAYOUTS, collate
from preftune.data.records import DataError, Pair, Ranked, plain_text
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.reward.cli import done_line
from preftune.reward.config import build_reward_config
from preftune.reward.encoder import encoder_examples
from preftune.reward.heads import Head
from preftune.reward.model import RewardModel, load_backbone
from preftune.reward.scoring import RewardScoring
from preftune.reward.train import train_reward_model
from tiny_models import save_tiny_encoder_dir, save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("abcdefghij") for _ in range(length))


def digit_pairs(count: int, seed: int) -> list[dict]:
    """Pairs whose better response is known: chosen hides one digit among letters, rejected is
    letters only; prompts and words are random, so held-out pairs are new strings."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        good = list(word(rng, rng.randint(2, 7)))
        good.insert(rng.randint(0, len(good)), rng.choice("0123456789"))
        rows.append({"prompt": f"Q: {word(rng, rng.randint(3, 10))}?", "chosen": "".join(good),
                     "rejected": word(rng, rng.randint(3, 8)), "margin": 0.5,
                     "category": "short" if len(good) < 5 else "long"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    save_tiny_model_dir(root / "decoder")
    save_tiny_encoder_dir(root / "encoder")
    write_jsonl(root / "train.jsonl", digit_pairs(256, 1))
    write_jsonl(root / "eval.jsonl", digit_pairs(96, 2))
    return root


def train(workspace: Path, name: str, **sections) -> Path:
    tree = {"output_dir": str(workspace / "runs" / name),
            "model": {"path": str(workspace / "decoder")},
            "data": {"train": str(workspace / "train.jsonl")},
            "train": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 4,
                      "warmup_ratio": 0.0, "seed": 0}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return train_reward_model(build_reward_config(tree), show_progress=False)


def conversation_records() -> list:
    prompts = [[{"role": "user", "content": "What is 3+4? Be brief, please."}],
               [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of France?"}]]
    return [Ranked(prompts[0], ("7", "It is 8.", "seven"), (2.0, 0.0, 1.0), origin="r:0"),
            Ranked(prompts[1], ("Paris", "Lyon, I think", "paris!"), (2.0, 0.0, 1.0),
                   origin="r:1")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("responses", [2, 3])
def test_every_layout_equals_separate_forwards_of_each_response(workspace, layout, responses):
    """Scores and gradients of the batched forward (any layout) equal transformers' own
    sequence-classification forward run on each prompt + response alone (fp32, 1e-5)."""
    head = Head(kind="attributes", attributes=("a", "b"))
    model, tokenizer = load_backbone(str(workspace / "decoder"), head)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a head that is not near zero
    reward_model = RewardModel(model, head).train()
    records = [Ranked(r.prompt, r.responses[:responses], r.response_scores[:responses],
                      origin=r.origin) for r in conversation_records()]
    examples, _ = tokenize_records(records, tokenizer, TokenizeSettings(256, 128))
    batch = collate(examples, tokenizer.pad_token_id, layout, max_row_tokens=60)
    outputs = reward_model(batch)
    assert outputs.shape == (2, responses, 2)
    weights = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    fast = torch.autograd.grad((outputs * weights).sum(), params)

    plain = torch.stack([torch.stack([
        model(input_ids=torch.tensor([example.prompt_ids + ids])).logits[0]
        for ids in example.response_ids]) for example in examples])
    slow = torch.autograd.grad((plain * weights).sum(), params)
    torch.testing.assert_close(outputs, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trained_model_reaches_held_out_accuracy_and_reloads_identically(workspace, tmp_path):
    """24 steps on 256 pairs: held-out accuracy >= 95%. The rule (a digit in the chosen
    response) is one token's presence, which the final token can see through attention; the
    held-out strings are new. It took 16 steps to pass 99% when this test was written, so 95%
    leaves room for numeric differences across machines and is far above chance (50%)."""
    run = train(workspace, "digits", train={"max_steps": 24})
    assert done_line(run) == (f"done: reward model in {run / 'model'} (AutoModelForSequence"
                              f"Classification loads it), metrics in {run / 'metrics.jsonl'}")
    code = main(["rm", "eval", "--model", str(run), "--data", str(workspace / "eval.jsonl")])
    assert code == 0
    results = json.loads((run / "rm_eval.json").read_text())
    assert results["accuracy"] >= 0.95
    assert results["pairs"] == 96
    assert set(results["accuracy_by"]["category"]) == {"short", "long"}
    assert (run / "rm_eval" / "rm_reliability.png").stat().st_size > 1000
    assert main(["rm", "eval", "--model", str(run), "--data", str(workspace / "eval.jsonl"),
                 "--output", str(tmp_path / "by-family"), "--category-field", "family"]) == 2
    # the run's HTML report shows the evaluation beside the training curves
    from preftune.report import write_report

    page = write_report(run).read_text()
    assert "Reward model evaluation (rm_eval.json)" in page and "reward loss" in page
    assert {"rm_reliability.png", "rm_rewards.png", "rm_accuracy_by_group.png"} <= {
        p.name for p in (run / "report").iterdir()}

    # reload: our scorer, and plain transformers on right-padded rows, give the same numbers
    scoring = RewardScoring.load(str(run))
    records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
               for i, r in enumerate(digit_pairs(8, 3))]
    ours = torch.stack(scoring.outputs(records))[..., 0]  # [8, 2]
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = [ex.prompt_ids + ids for ex in scoring.examples(records) for ids in ex.response_ids]
    width = max(map(len, rows))
    padded = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    with torch.no_grad():
        logits = hf(input_ids=padded, attention_mask=(padded != tokenizer.pad_token_id).long())
    torch.testing.assert_close(logits.logits.view(8, 2), ours, atol=1e-5, rtol=1e-5)
    # and the trained model agrees with the accuracy it was evaluated at
    assert (ours[:, 0] > ours[:, 1]).float().mean().item() >= 0.95


def test_encoder_backbone_scores_like_automodel_on_text_pairs(workspace):
    """An encoder reward model reads [CLS] prompt [SEP] response [SEP]; the saved model gives
    the same outputs from tokenizer(prompt, response) through AutoModelForSequenceClassification."""
    run = train(workspace, "encoder", model={"path": str(workspace / "encoder")},
                train={"max_steps": 3})
    info = json.loads((run / "run.json").read_text())
    assert info["layout"] == "padded"
    rows = digit_pairs(6, 4)
    records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
               for i, r in enumerate(rows)]
    ours = torch.stack(RewardScoring.load(str(run)).outputs(records))[..., 0]
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    responses = [text for r in rows for text in (r["chosen"], r["rejected"])]
    with torch.no_grad():
        logits = hf(**tokenizer(prompts, responses, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits.view(6, 2), ours, atol=1e-5, rtol=1e-5)


def test_encoder_text_pair_ids_match_the_tokenizer(workspace):
    tokenizer = AutoTokenizer.from_pretrained(workspace / "encoder")
    record = Pair([{"role": "user", "content": "what is 3+4?"}], "the answer is 7", "no")
    (example,), _ = encoder_examples([record], tokenizer, TokenizeSettings(64, 32))
    expected = tokenizer(plain_text(record.prompt), "the answer is 7")["input_ids"]
    assert example.prompt_ids + example.response_ids[0] == expected


@pytest.mark.parametrize("variant", [{}, {"dora": True}, {"init": "pissa"},
                                     {"modules_to_save": ["embed_tokens"]}])
def test_lora_reward_model_saves_adapter_and_merged_model(workspace, variant):
    """(PiSSA's adapter is saved as one of the original backbone: it loads on that.)"""
    from peft import PeftModel

    run = train(workspace, "lora-" + "-".join(variant),
                model={"lora": {"r": 4, "alpha": 8, **variant}}, train={"max_steps": 3})
    assert (run / "adapter" / "preftune_reward.json").exists()
    from preftune.train.model_card import front_matter

    cards = {kind: front_matter((run / kind / "README.md").read_text())
             for kind in ("adapter", "model")}
    assert cards["adapter"]["library_name"] == "peft" and "lora" in cards["adapter"]["tags"]
    assert cards["model"]["library_name"] == "preftune"
    records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
               for i, r in enumerate(digit_pairs(4, 5))]
    merged = torch.stack(RewardScoring.load(str(run)).outputs(records))
    base, _ = load_backbone(str(workspace / "decoder"), Head())
    adapted = RewardModel(PeftModel.from_pretrained(base, run / "adapter"), Head()).eval()
    scoring = RewardScoring.load(str(run))
    with torch.no_grad():
        via_adapter = adapted(scoring.make_batch(scoring.examples(records)))
    torch.testing.assert_close(via_adapter, merged, atol=1e-5, rtol=1e-5)


def test_an_unmerged_lora_reward_model_scores_as_the_merged_one(workspace, tmp_path):
    """With model.lora.save_merged: false only adapter/ is written; every command that takes
    a reward model loads it on its base (it was 'not a preftune reward model'), scoring as the
    merged model of the same training does."""
    from preftune.cli import main
    from preftune.reward.cli import done_line

    settings = {"model": {"lora": {"r": 4, "alpha": 8}}, "train": {"max_steps": 3}}
    merged = train(workspace, "lora-merged", **settings)
    settings["model"]["lora"]["save_merged"] = False
    unmerged = train(workspace, "lora-unmerged", **settings)
    assert not (unmerged / "model").exists() and (unmerged / "adapter").is_dir()
    assert done_line(unmerged).startswith(f"done: reward model as a LoRA adapter in "
                                          f"{unmerged / 'adapter'}")
    records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
               for i, r in enumerate(digit_pairs(4, 5))]
    ours, theirs = (torch.stack(RewardScoring.load(str(run)).outputs(records))
                    for run in (unmerged, merged))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    data = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(4, 5))
    assert main(["rm", "score", "--model", str(unmerged), "--data", str(data), "--output",
                 str(tmp_path / "scored.jsonl")]) == 0
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 4
    # rm eval writes into the run dir (it wrote into the working directory)
    assert main(["rm", "eval", "--model", str(unmerged), "--data", str(data)]) == 0
    assert (unmerged / "rm_eval.json").is_file()
    # and training goes on from it (it was a traceback: the adapter dir has no model config)
    more = train(workspace, "lora-more", model={"path": str(unmerged / "adapter")},
                 train={"max_steps": 1, "learning_rate": 0.0})
    ours = torch.stack(RewardScoring.load(str(more)).outputs(records))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # (it learnt nothing)


def test_ranked_lists_train_with_plackett_luce_and_score_as_lists(workspace, tmp_path):
    rows = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["rejected"] + "x"],
             "scores": [2, 1, 0]} for r in digit_pairs(64, 6)]
    data = write_jsonl(tmp_path / "lists.jsonl", rows)
    run = train(workspace, "lists", data={"train": str(data)}, loss={"name": "plackett_luce"})
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/accuracies", "rewards/top1_accuracy"} <= set(metrics[0])
    out = tmp_path / "scored.jsonl"
    # the lists already hold "scores": the model's go under another name, nothing is replaced
    assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                 str(out)]) == 2
    assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                 str(out), "--field", "reward"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 64 and len(scored[0]["rewards"]) == 3
    assert scored[0]["scores"] == [2, 1, 0] and scored[0]["origin"].endswith("lists.jsonl:1")
    # and they feed the list -> pairs converters by naming that field
    from preftune.data.convert import convert
    from preftune.data.sources import load_records

    pairs = convert(load_records(str(out), fields={"scores": "rewards"}), "pairs:best_vs_worst")
    best = max(range(3), key=lambda k: scored[0]["rewards"][k])
    assert pairs[0].chosen == scored[0]["responses"][best]
    # lists with neither scores nor ranks (samples to judge) get their "scores" written
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": r["prompt"],
                                                  "responses": r["responses"]} for r in rows])
    assert main(["rm", "score", "--model", str(run), "--data", str(bare), "--output",
                 str(tmp_path / "bare_scored.jsonl")]) == 0
    rescored = [json.loads(line) for line in (tmp_path / "bare_scored.jsonl").open()]
    assert [r["scores"] for r in rescored] == [s["rewards"] for s in scored]
    with pytest.raises(DataError, match="both are missing"):  # training still needs them
        load_records(str(bare))


def test_rm_score_output_feeds_margin_objectives(workspace, tmp_path):
    """Scores written for pairs are the chosen_score/rejected_score fields odpo and modpo read."""
    run = train(workspace, "for-scoring", train={"max_steps": 2})
    rows = digit_pairs(12, 7)
    for row in rows:
        del row["margin"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                 str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    scoring = RewardScoring.load(str(run))
    records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=str(i))
               for i, r in enumerate(rows)]
    expected = torch.stack(scoring.outputs(records))[..., 0]
    assert [s["chosen_score"] for s in scored] == pytest.approx(expected[:, 0].tolist(), abs=1e-6)
    assert [s["rejected_score"] for s in scored] == pytest.approx(expected[:, 1].tolist(),
                                                                  abs=1e-6)
    assert scored[0]["prompt"] == rows[0]["prompt"] and scored[3]["origin"].endswith(":4")
    # a file with other column names is read with --column (rm eval too), its rows kept as
    # they are
    names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    renamed = write_jsonl(tmp_path / "renamed.jsonl",
                          [{names.get(k, k): v for k, v in row.items()} for row in rows])
    columns = [f"--column={k}={v}" for k, v in names.items()]
    assert main(["rm", "score", "--model", str(run), "--data", str(renamed), "--output",
                 str(tmp_path / "renamed-scored.jsonl"), *columns]) == 0
    mapped = [json.loads(line) for line in (tmp_path / "renamed-scored.jsonl").read_text()
              .splitlines()]
    assert [s["chosen_score"] for s in mapped] == [s["chosen_score"] for s in scored]
    assert mapped[0]["question"] == rows[0]["prompt"] and "prompt" not in mapped[0]
    for data_file, out_dir, flags in ((data, "eval-plain", []), (renamed, "eval-mapped", columns)):
        assert main(["rm", "eval", "--model", str(run), "--data", str(data_file), "--output",
                     str(tmp_path / out_dir), *flags]) == 0
    plain, by_columns = (json.loads((tmp_path / d / "rm_eval.json").read_text())
                         for d in ("eval-plain", "eval-mapped"))
    assert by_columns["pairs"] == 12 and by_columns["accuracy"] == plain["accuracy"]
    plain, by_columns = ([json.loads(line)["reward_chosen"] for line in
                          (tmp_path / d / "rm_eval_pairs.jsonl").read_text().splitlines()]
                         for d in ("eval-plain", "eval-mapped"))
    assert by_columns == plain and by_columns[0] == mapped[0]["chosen_score"]
    # the scored file trains modpo (its margin reward) as it is
    from preftune.config import build_config
    from preftune.train import loop

    policy = loop.train(build_config({
        "output_dir": str(tmp_path / "modpo"), "model": {"path": str(workspace / "decoder")},
        "data": {"train": str(out)}, "objective": {"name": "modpo"},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 4, "max_steps": 1}}), show_progress=False)
    assert (policy / "model" / "model.safetensors").exists()
    # a second run refuses to overwrite the scores it already holds, or an existing file
    again = ["rm", "score", "--model", str(run), "--data", str(out), "--output",
             str(tmp_path / "again.jsonl")]
    assert main(again) == 2
    assert main(again + ["--field", "rm2"]) == 0
    rescored = [json.loads(line) for line in (tmp_path / "again.jsonl").open()]
    assert [r["origin"] for r in rescored] == [s["origin"] for s in scored]  # the first origins
    assert main(again + ["--field", "rm3"]) == 2
    assert main(again + ["--field", "rm3", "--overwrite"]) == 0


def test_rm_score_refuses_a_taken_field_before_loading_or_scoring(workspace, tmp_path, capsys,
                                                                   monkeypatch):
    """A score field the input rows already hold stops ``rm score`` before the weights load or
    any record is scored, naming the record and the field; no output file is written."""
    from preftune.reward import scoring

    run = train(workspace, "for-refusal", train={"max_steps": 1})
    rows = [{"prompt": "p", "chosen": "a1", "rejected": "b"},
            {"prompt": "p", "chosen": "a2", "rejected": "b", "rejected_score": 0.5}]
    data = write_jsonl(tmp_path / "scored-before.jsonl", rows)
    out = tmp_path / "out.jsonl"

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(scoring.RewardScoring, "load", no_loading)
    assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "scored-before.jsonl:2: field 'rejected_score' already exists" in err
    assert not out.exists() and not out.with_name("out.jsonl.partial").exists()
    monkeypatch.undo()
    assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                 str(out), "--field", "rm"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(set(written[1]) - set(rows[1])) == ["chosen_rm", "origin", "rejected_rm",
                                                      "rm_preference"]
    assert written[1]["rejected_score"] == 0.5


def test_rm_score_refuses_single_responses_for_a_gpm_model_before_scoring(workspace, tmp_path,
                                                                          capsys):
    """A GPM model has no reward of one response: single responses are refused up front,
    naming the record, and nothing is left behind (no half-written output)."""
    run = train(workspace, "gpm-for-refusal", loss={"name": "gpm"}, train={"max_steps": 1})
    data = write_jsonl(tmp_path / "singles.jsonl", [{"prompt": "p", "response": "a"}])
    out = tmp_path / "out.jsonl"
    assert main(["rm", "score", "--model", str(run), "--data", str(data), "--output",
                 str(out)]) == 2
    assert "singles.jsonl:1: a GPM reward model compares responses" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["singles.jsonl"]


@pytest.mark.parametrize("loss, head, rows, message", [
    ("bt_margin", {}, [{"prompt": "p", "chosen": "a1", "rejected": "b"},
                       {"prompt": "p", "chosen": "a2", "rejected": "b", "margin": 1}],
     ["bad.jsonl:1", "'margin'", "the reward loss bt_margin (loss.margin_field)"]),
    ("scaled_bt", {}, [{"prompt": "p", "chosen": "a", "rejected": "b", "magnitude": 2},
                       {"prompt": "p", "chosen": "a", "rejected": "b", "magnitude": -1}],
     ["bad.jsonl:2", "'magnitude' is -1.0", "the reward loss scaled_bt (loss.magnitude_field)",
      "as a finite number, not negative"]),
    ("regression", {"kind": "attributes", "attributes": ["help"]},
     [{"prompt": "p", "response": "a", "help": 2}, {"prompt": "p", "response": "b"}],
     ["bad.jsonl:2", "'help'", "regression (model.head.attributes)"]),
    ("regression", {}, [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 1}],
     ["bad.jsonl:1", "'rejected_score'", "regression (loss.target)"]),
    ("bt", {}, [{"prompt": "p", "completion": "a", "label": True}],
     ["bt trains on pairs", "unpaired", "bad.jsonl"]),
    ("bt", {}, [{"prompt": "p", "chosen": "a"}], ["bad.jsonl:1", "'rejected'"]),
])
def test_bad_input_names_file_record_and_field(workspace, tmp_path, capsys, monkeypatch, loss,
                                               head, rows, message):
    from preftune.reward import train as reward_train

    loaded = []
    monkeypatch.setattr(reward_train, "load_backbone", lambda *a, **k: loaded.append(a))
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["rm", "train", "--set", f"output_dir={tmp_path / 'run'}",
                 "--set", f"model.path={workspace / 'decoder'}", "--set", f"data.train={bad}",
                 "--set", f"loss.name={loss}", "--set", f"model.head={json.dumps(head)}",
                 "--set", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and loaded == []  # the data is checked before the weights load
    assert not (tmp_path / "run" / "config.yaml").exists()  # and no run is left behind
    for part in message:
        assert part in err, (part, err)


def test_decoder_or_encoder_is_known_from_the_config_before_the_weights_load(workspace):
    from preftune.reward.model import scores_last_token

    for backbone, decoder in (("decoder", True), ("encoder", False)):
        assert scores_last_token(str(workspace / backbone)) is decoder
        model, _ = load_backbone(str(workspace / backbone), Head())
        assert RewardModel(model, Head()).last_token is decoder


@pytest.mark.parametrize("tree, message", [
    ({"loss": {"name": "gpm"}, "model": {"head": {"kind": "scalar"}}},
     "reward loss gpm fits a gpm head"),
    ({"loss": {"name": "bt", "margin": 1}}, "unknown key 'loss.margin'"),
    ({"loss": {"name": "btt"}}, "Did you mean bt"),
    ({"loss": {"name": "quantile"}, "model": {"head": {"quantiles": [0.5, 0.2]}}},
     "increasing levels"),
    # regression reads the names from the data when none are given; bt cannot
    ({"loss": {"name": "bt"}, "model": {"head": {"kind": "attributes"}}},
     "names of its ratings"),
])
def test_config_errors_name_the_key(tree, message):
    with pytest.raises(ConfigError, match=message):
        build_reward_config(tree)


def test_auto_head_follows_the_loss():
    assert build_reward_config({"loss": {"name": "gpm"}}).head.kind == "gpm"
    assert build_reward_config({"loss": {"name": "quantile"}}).head.kind == "quantile"
    assert build_reward_config({"loss": {"name": "regression"}, "model": {"head": {
        "attributes": ["help", "safe"]}}}).head.kind == "attributes"
    assert build_reward_config({}).head.kind == "scalar"


def test_rm_eval_refuses_unpaired_data(workspace, tmp_path, capsys):
    run = train(workspace, "eval-shape", train={"max_steps": 1})
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    assert main(["rm", "eval", "--model", str(run), "--data", str(data)]) == 2
    assert "rm score" in capsys.readouterr().err


def test_layouts_and_checkpointing_train_identically(workspace):
    """Same per-step losses and grad norms whatever the layout, with activation checkpointing."""
    def curve(name, **train_settings):
        run = train(workspace, name, train={"max_steps": 3, **train_settings})
        return [(m["loss"], m["grad_norm"]) for m in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    baseline = curve("padded", layout="padded")
    for name, settings in [("shared", {"layout": "prefix_shared"}),
                           ("packed", {"layout": "packed_prefix_shared", "max_row_tokens": 64}),
                           ("gc", {"layout": "prefix_shared", "gradient_checkpointing": True})]:
        other = curve(name, **settings)
        for (loss, norm), (loss2, norm2) in zip(baseline, other, strict=True):
            assert loss2 == pytest.approx(loss, rel=1e-5) and norm2 == pytest.approx(norm, rel=1e-4)


@pytest.mark.parametrize("backbone", ["decoder", "encoder"])
def test_checkpointed_reward_model_recomputes_under_the_forwards_attention_kernels(workspace,
                                                                                   backbone):
    """With activation checkpointing, a reward model's attention runs with cuDNN's SDPA kernel
    left out both in the forward and in its recomputation in backward (the recomputed
    gradients are the plain backward's only with the forward's kernel)."""
    from accelerate import Accelerator

    from preftune.reward.train import reward_task

    config = build_reward_config({
        "output_dir": str(workspace / "runs" / f"kernels-{backbone}"),
        "model": {"path": str(workspace / backbone)},
        "data": {"train": str(workspace / "train.jsonl")},
        "train": {"batch_size": 4, "max_steps": 1, "gradient_checkpointing": True}})
    task, _ = reward_task(config, Accelerator(cpu=True))
    attention = next(module for name, module in task.module.named_modules()
                     if name.endswith("layers.0.self_attn") or name.endswith("layer.0.attention"))
    seen = []
    attention.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
         torch.backends.cuda.mem_efficient_sdp_enabled())))
    batch = task.make_batch(task.train_examples[:4])
    losses, _ = task.losses(task.module, batch, 0)
    assert seen == [(False, False, True)]  # the checkpointed forward keeps no graph
    losses.mean().backward()
    assert seen == [(False, False, True), (True, False, True)]


def test_a_new_head_is_one_line_and_a_missing_backbone_weight_a_warning(workspace, tmp_path,
                                                                         capsys, caplog):
    from safetensors.torch import load_file, save_file

    for kind, head in (("decoder", "score.weight"), ("encoder", "classifier.bias, "
                                                                "classifier.weight")):
        load_backbone(str(workspace / kind), Head())
        assert capsys.readouterr().out == (f"{workspace / kind}: the reward head ({head}) is "
                                           "new and starts from random weights\n")
    assert "LOAD REPORT" not in caplog.text
    damaged = tmp_path / "damaged"
    save_tiny_model_dir(damaged)
    weights = load_file(damaged / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    load_backbone(str(damaged), Head())
    assert capsys.readouterr().out.splitlines()[1] == (
        f"warning: {damaged} lacks 1 backbone weights, which start from random values: "
        "model.layers.1.mlp.up_proj.weight. Check that model.path is the model you meant.")
    saved = tmp_path / "saved"  # a trained reward model keeps its head: nothing to say
    model, tokenizer = load_backbone(str(workspace / "decoder"), Head())
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    capsys.readouterr()
    load_backbone(str(saved), Head())
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("backbone, top", [("decoder", "model.layers.1."),
                                           ("encoder", "bert.encoder.layer.1.")])
def test_partial_training_moves_the_top_layer_and_the_head_only(workspace, backbone, top):
    """(The head is new, so its start is random: it counts as moved whatever happens.)"""
    from safetensors.torch import load_file

    run = train(workspace, f"top-{backbone}", model={"path": str(workspace / backbone),
                                                     "train_layers": 1},
                train={"max_steps": 2})
    start, _ = load_backbone(str(workspace / backbone), Head())
    start = start.state_dict()
    end = load_file(run / "model" / "model.safetensors")
    changed = {name for name, value in end.items()
               if name not in start or not torch.equal(value, start[name])}
    head = {name for name in changed if not name.startswith(top)}
    assert head and all(name.startswith(("score.", "classifier.")) for name in head)
    assert len(changed - head) == sum(1 for name in start if name.startswith(top))


def test_resume_of_a_finished_reward_model_checks_its_data(workspace, tmp_path):
    from preftune.config import ConfigError

    data = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(32, 5))
    out = train(workspace, "finished", data={"train": str(data)}, train={"max_steps": 2})
    tree = {"output_dir": str(out), "model": {"path": str(workspace / "decoder")},
            "data": {"train": str(data)},
            "train": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 2,
                      "warmup_ratio": 0.0, "seed": 0}}
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert train_reward_model(build_reward_config(tree), resume=True,
                              show_progress=False) == out  # the same data: kept as it is
    write_jsonl(data, digit_pairs(32, 6))
    with pytest.raises(ConfigError, match=f"what {out} trained on .*; its finished model was "
                                          "trained on other examples"):
        train_reward_model(build_reward_config(tree), resume=True, show_progress=False)
    assert (out / "model" / "model.safetensors").read_bytes() == weights
