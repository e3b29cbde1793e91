"""Public preference datasets as they are published: each layout read without editing, the
detection sentence, dataset directories, hub-cache folders and ``dir:split``."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data.convert import convert
from preftune.data.records import DataError, Pair, Ranked, Rated
from preftune.data.sources import load_records


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def binarized_row(prompt, good, bad, score_good=8.0, score_bad=3.0):
    """A row as in HuggingFaceH4/ultrafeedback_binarized's *_prefs splits."""
    return {"prompt": prompt, "prompt_id": "abc123",
            "chosen": [user(prompt), assistant(good)], "rejected": [user(prompt), assistant(bad)],
            "messages": [user(prompt), assistant(good)],
            "score_chosen": score_good, "score_rejected": score_bad}


BINARIZED = [binarized_row("Name a prime.", "7", "8"),
             binarized_row("Capital of Peru?", "Lima", "Cusco", 9.0, 2.5)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load(path, **options):
    detected = []
    records = load_records(str(path), detected=detected, **options)
    return records, "{source}: {layout}: {why}".format(**detected[0])


def check_binarized(pairs):
    assert all(isinstance(p, Pair) for p in pairs)
    assert [p.prompt for p in pairs] == [[user("Name a prime.")], [user("Capital of Peru?")]]
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ([assistant("7")], [assistant("8")]), ([assistant("Lima")], [assistant("Cusco")])]
    assert pairs[1].scores == {"score_chosen": 9.0, "score_rejected": 2.5}


def test_ultrafeedback_binarized_is_detected_and_the_repeated_prompt_stripped(tmp_path):
    pairs, detected = load(write_jsonl(tmp_path / "uf.jsonl", BINARIZED))
    check_binarized(pairs)
    assert "ultrafeedback-binarized: string 'prompt' + chosen/rejected message lists that start " \
           "with the prompt" in detected and "shape detected: pairs" in detected


def test_hub_style_parquet_dataset_dir_with_split(tmp_path):
    root = tmp_path / "ultrafeedback_binarized"
    (root / "data").mkdir(parents=True)
    for split, rows in (("train_prefs", BINARIZED), ("test_prefs", BINARIZED[:1]),
                        ("train_sft", BINARIZED[:1])):
        pq.write_table(pa.Table.from_pylist(rows),
                       root / "data" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs: ...\n---\n")
    pairs, detected = load(f"{root}:train_prefs")
    check_binarized(pairs)
    assert detected.startswith(f"{root}, split 'train_prefs' "
                               "(data/train_prefs-00000-of-00001.parquet): ultrafeedback-binarized")
    assert pairs[0].origin == f"{root}/data/train_prefs-00000-of-00001.parquet:record 0"
    assert len(load_records(f"{root}:test_prefs")) == 1
    with pytest.raises(DataError, match=r"splits test_prefs, train_prefs, train_sft; choose one "
                                        r"with '.*:SPLIT'"):
        load_records(str(root))
    with pytest.raises(DataError, match="no split 'valid'"):
        load_records(f"{root}:valid")


def test_saved_dataset_dict_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "saved"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(BINARIZED),
                          "test_prefs": datasets.Dataset.from_list(BINARIZED[:1])}
                         ).save_to_disk(str(root))
    pairs, detected = load(f"{root}:train_prefs")
    check_binarized(pairs)
    assert "(saved with save_to_disk), split 'train_prefs'" in detected and pairs[0].origin.endswith(
        "saved:train_prefs:record 0")


def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    folder = cache / "datasets--HuggingFaceH4--ultrafeedback_binarized"
    snapshot = folder / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(BINARIZED),
                   snapshot / "data" / "train_prefs-00000-of-00001.parquet")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return folder


def test_hub_cache_by_name_or_folder(tmp_path, monkeypatch):
    folder = hub_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    pairs, detected = load("HuggingFaceH4/ultrafeedback_binarized:train_prefs")
    check_binarized(pairs)
    assert detected.startswith("HuggingFaceH4/ultrafeedback_binarized (hub cache), split "
                               "'train_prefs'")
    # one split only: no need to name it; the cache folder itself works too
    check_binarized(load_records(str(folder)))
    with pytest.raises(DataError) as error:
        load_records("HuggingFaceH4/not_here:train")
    message = str(error.value)
    assert "datasets--HuggingFaceH4--not_here" in message and "never downloads" in message
    assert "hf download --repo-type dataset HuggingFaceH4/not_here" in message


def test_message_list_prompt_repeated_in_responses_is_stripped(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi")]
    rows = [{"prompt": prompt, "chosen": prompt + [assistant("Hello!")],
             "rejected": prompt + [assistant("Go away.")]}]
    pairs, detected = load(write_jsonl(tmp_path / "r.jsonl", rows))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        prompt, [assistant("Hello!")], [assistant("Go away.")])
    assert detected.endswith("implicit with a message-list prompt: chosen/rejected are whole "
                             "dialogues that start with 'prompt'; it is checked against their "
                             "opening and stripped from the responses (shape detected: pairs)")
    # forced conversational: the whole dialogue is not taken for a response
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'chosen': a message list that starts "
                                        r"with a 'system' message.*format 'auto' or 'implicit'"):
        load_records(str(tmp_path / "r.jsonl"), format="conversational")


def test_repeated_prompt_that_does_not_match_names_record_and_field(tmp_path):
    prompt = [user("Hi")]
    rows = [{"prompt": prompt, "chosen": prompt + [assistant("a")],
             "rejected": [user("Hello")] + [assistant("b")]}]
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'rejected' should repeat the prompt "
                                        r"\(a whole dialogue\), but its message 0 has user: "
                                        r"'Hello' where 'prompt' has user: 'Hi'"):
        load_records(write_jsonl(tmp_path / "m.jsonl", rows))
    row = binarized_row("Name a prime.", "7", "8")
    row["prompt"] = "Name an even number."
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'prompt' \(prompt\) does not match the "
                                        r"dialogue.*'Name a prime\.'.*'Name an even number\.'"):
        load_records(write_jsonl(tmp_path / "s.jsonl", [BINARIZED[0], row]))
    row = binarized_row("Name a prime.", "7", "8")
    row["rejected"][0] = user("Name an odd number.")
    with pytest.raises(DataError, match=r"o\.jsonl:2: fields 'chosen' and 'rejected' should both "
                                        r"open with the prompt of field 'prompt', but they open "
                                        r"differently \(chosen: 'Name a prime\.'; rejected: "
                                        r"'Name an odd number\.'\)"):
        load_records(write_jsonl(tmp_path / "o.jsonl", [BINARIZED[0], row]))


def test_implicit_format_with_a_prompt_column_says_and_strips_it(tmp_path):
    rows = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}]
    pairs, detected = load(write_jsonl(tmp_path / "i.jsonl", rows), format="implicit")
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        "\n\nHuman: Hi\n\nAssistant:", " Hello", " Go")
    assert "implicit with a string prompt" in detected and "checked against their opening " \
           "and stripped" in detected and "format set: implicit" in detected
    rows[0]["rejected"] = "\n\nHuman: Hey\n\nAssistant: Go"
    with pytest.raises(DataError, match=r"i\.jsonl:1: field 'rejected' \(rejected\) does not "
                                        r"start with the text of 'prompt'"):
        load_records(write_jsonl(tmp_path / "i.jsonl", rows), format="implicit")
    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}]
    pairs, detected = load(write_jsonl(tmp_path / "hh.jsonl", hh))
    assert pairs[0].prompt == "\n\nHuman: Hi\n\nAssistant:" and "hh-dialogues: no prompt column" \
        in detected


def completion(text, overall, fine):
    """One item of openbmb/UltraFeedback's ``completions``."""
    return {"model": "m", "principle": "helpfulness", "custom_system_prompt": "",
            "response": text, "overall_score": overall, "fine-grained_score": fine,
            "critique": "...", "annotations": {"helpfulness": {"Rating": "4", "Rationale": "."}}}


ULTRAFEEDBACK = [{"source": "evol_instruct", "instruction": "Name a prime.",
                  "models": ["a", "b", "c"],
                  "completions": [completion("8", 3.0, 2.25), completion("7", 8.5, 4.5),
                                  completion("9", 5.0, 1.75)]}]


def test_ultrafeedback_completions_become_ranked_lists_and_pairs(tmp_path):
    lists, detected = load(write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK))
    assert isinstance(lists[0], Ranked) and lists[0].prompt == "Name a prime."
    assert lists[0].responses == ("8", "7", "9")
    assert lists[0].response_scores == (3.0, 8.5, 5.0)
    assert detected.split(": ", 1)[1].startswith("ultrafeedback: 'instruction' + 'completions'") \
        and "scored by its 'overall_score'" in detected
    pairs = convert(lists, "pairs:best_vs_worst")
    assert (pairs[0].chosen, pairs[0].rejected) == ("7", "8")
    assert pairs[0].scores == {"chosen_score": 8.5, "rejected_score": 3.0}
    fine = load_records(str(tmp_path / "uf.jsonl"), fields={"scores": "fine-grained_score"})
    assert fine[0].response_scores == (2.25, 4.5, 1.75)
    bad = json.loads(json.dumps(ULTRAFEEDBACK))
    bad[0]["completions"][2]["overall_score"] = "N/A"
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'completions', item 2: score "
                                        r"'overall_score' is str 'N/A'"):
        load_records(write_jsonl(tmp_path / "b.jsonl", bad))


HELPSTEER = [{"prompt": "Name a prime.", "response": "7", "helpfulness": 4, "correctness": 4,
              "coherence": 4, "complexity": 1, "verbosity": 0},
             {"prompt": "Name a prime.", "response": "8", "helpfulness": 1, "correctness": 0,
              "coherence": 3, "complexity": 1, "verbosity": 0}]


def test_helpsteer_rows_are_rated_with_their_attributes(tmp_path):
    rated, detected = load(write_jsonl(tmp_path / "hs.jsonl", HELPSTEER))
    assert all(isinstance(r, Rated) for r in rated) and rated[1].response == "8"
    assert rated[1].scores == {"helpfulness": 1, "correctness": 0, "coherence": 3,
                               "complexity": 1, "verbosity": 0}
    assert "helpsteer: string prompt + 'response' + numeric ratings helpfulness, correctness, " \
           "coherence, complexity, verbosity" in detected


def rm_train_regression(tmp_path, data) -> None:
    """``preftune rm train`` with the regression loss, 2 steps of a tiny model, into rm/."""
    from preftune.cli import main
    from tiny_models import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "model")
    assert main(["rm", "train", "--set", f"model.path={tmp_path / 'model'}",
                 "--set", f"data.train={data}", "--set", "loss.name=regression",
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4",
                 "--set", f"output_dir={tmp_path / 'rm'}"]) == 0


def test_rm_train_regression_detects_the_helpsteer_attributes(tmp_path, capsys):
    data = write_jsonl(tmp_path / "hs.jsonl", HELPSTEER * 4)
    rm_train_regression(tmp_path, data)
    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    saved = json.loads((tmp_path / "rm" / "model" / "preftune_reward.json").read_text())
    assert saved["head"]["kind"] == "attributes" and saved["head"]["attributes"] == names
    report = json.loads((tmp_path / "rm" / "data_report.json").read_text())
    assert report["head"] == (f"attributes {', '.join(names)}: the numeric columns of {data}:1 "
                              "and the rows after it, up to 50 (no model.head.attributes given "
                              "and no 'score' column for a scalar head; set "
                              "model.head.attributes to choose others)")
    assert report["detected"] == [{"source": data, "layout": "helpsteer", "why": (
        f"string prompt + 'response' + numeric ratings {', '.join(names)} (shape detected: "
        "rated)")}]
    out = capsys.readouterr().out
    assert "model.head: attributes helpfulness" in out and "data: " in out


def test_helpsteer_ratings_written_as_text_are_read_and_detected(tmp_path):
    """Exports that quote every value ("4") rate and train like numbers."""
    quoted = [{k: v if k in ("prompt", "response") else str(v) for k, v in row.items()}
              for row in HELPSTEER]
    rated, detected = load(write_jsonl(tmp_path / "hs.jsonl", quoted))
    assert rated[1].scores == {"helpfulness": 1.0, "correctness": 0.0, "coherence": 3.0,
                               "complexity": 1.0, "verbosity": 0.0}
    assert "numeric ratings helpfulness, correctness, coherence, complexity, verbosity" \
        in detected
    rm_train_regression(tmp_path, write_jsonl(tmp_path / "quoted.jsonl", quoted * 4))
    saved = json.loads((tmp_path / "rm" / "model" / "preftune_reward.json").read_text())
    assert saved["head"]["attributes"] == ["helpfulness", "correctness", "coherence",
                                           "complexity", "verbosity"]


def readme_block(heading: str, index: int) -> str:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split(f"### {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```")[2 * index + 1].split("\n", 1)[1]


def test_readme_data_formats_commands_run(tmp_path, monkeypatch, capsys):
    import shlex

    from preftune.cli import main
    from tiny_models import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    hub_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "ultrafeedback.jsonl", ULTRAFEEDBACK)
    write_jsonl(tmp_path / "helpsteer.jsonl", HELPSTEER * 4)
    commands = [shlex.split(line) for line in readme_block("Data formats", 0).splitlines()]
    assert [c[:3] for c in commands] == [["preftune", "data", "inspect"]] * 2 + [
        ["preftune", "rm", "train"]]
    outputs = []
    for command in commands:
        # the tiny model instead of the bundled one, and one training step
        extra = (["--model", str(model)] if command[1] == "data" else
                 ["--set", f"model.path={model}", "--set", "train.max_steps=1"])
        assert main(command[1:] + extra) == 0, command
        outputs.append(capsys.readouterr().out)
    shown = readme_block("Data formats", 1).splitlines()
    assert outputs[0].startswith("\n".join(shown[:2]) + "\n" + shown[2].removesuffix("..."))
    assert "layout              ultrafeedback\n" in outputs[1]
    assert "example 0" in outputs[0] and "model.head: attributes helpfulness" in outputs[2]


def test_hh_rlhf_and_helpsteer2_hub_layouts_with_gzip_files(tmp_path):
    import gzip

    def gz(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    def hh(answer):
        return {"chosen": f"\n\nHuman: Hi\n\nAssistant: {answer}",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}

    root = tmp_path / "hh-rlhf"  # Anthropic/hh-rlhf: one folder per subset, train/test files
    gz(root / "harmless-base" / "train.jsonl.gz", [hh("Hello.")])
    gz(root / "helpful-base" / "train.jsonl.gz", [hh("Hi!")])
    gz(root / "helpful-base" / "test.jsonl.gz", [hh("Hey.")])
    pairs, detected = load(root)  # the train files of every subset, as the hub's default
    assert [p.chosen for p in pairs] == [" Hello.", " Hi!"]
    assert pairs[1].origin == f"{root}/helpful-base/train.jsonl.gz:1"
    assert "split 'train' (harmless-base/train.jsonl.gz, helpful-base/train.jsonl.gz): " \
           "hh-dialogues" in detected
    assert [p.chosen for p in load_records(f"{root}/helpful-base:test")] == [" Hey."]

    root = tmp_path / "HelpSteer2"  # nvidia/HelpSteer2: train/validation plus subfolders
    gz(root / "train.jsonl.gz", HELPSTEER)
    gz(root / "validation.jsonl.gz", HELPSTEER[:1])
    gz(root / "preference" / "preference.jsonl.gz", [{"prompt": "p", "response_1": "a"}])
    assert [r.response for r in load_records(str(root))] == ["7", "8"]
    assert len(load_records(f"{root}:validation")) == 1
    (root / "broken.jsonl.gz").write_text("not gzip")
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read as gzip-compressed"):
        load_records(f"{root}:broken")


def test_string_prompt_with_reply_only_message_lists_says_what_to_change(tmp_path):
    rows = [{"prompt": "Hi", "chosen": [assistant("Hello")], "rejected": [assistant("Go")]}]
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'chosen' \(chosen\): format 'standard' "
                                        r"expects a string, got list.*Message-list responses need "
                                        r"a message-list prompt"):
        load_records(write_jsonl(tmp_path / "a.jsonl", rows))


def test_text_content_parts_are_read_as_text(tmp_path):
    """{"type": "text", "text": ...} parts (the multimodal message form) without an image are
    the message's text: a text model's template would otherwise write the list's Python repr
    into the prompt. Parts with an image stay parts (a vision model's processor reads them)."""
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    rows = [{"prompt": [{"role": "user", "content": parts}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}],
             "rejected": [{"role": "assistant", "content": "Go away"}]},
            {"prompt": [{"role": "user", "content": [{"type": "image"}, *parts]}],
             "chosen": "a cat", "rejected": "a dog", "images": ["cat.png"]}]
    path = tmp_path / "parts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    (record,) = load_records(str(path))
    assert record.prompt == [{"role": "user", "content": "Hello there"}]
    assert record.chosen == [{"role": "assistant", "content": "Hi"}]
    from preftune.data.messages import read_messages

    assert read_messages(rows[1]["prompt"], "prompt", "x:1")[0]["content"] == [
        {"type": "image"}, *parts]


def test_a_bad_rating_in_the_first_record_is_named_not_its_column_dropped(tmp_path, capsys):
    """The attributes come from the first rows' numeric columns: a bad value in record 1 used
    to drop its column for the whole file (the head trained on four attributes)."""
    from preftune.cli import main
    from tiny_models import save_tiny_model_dir

    rows = [dict(HELPSTEER[0], correctness="x")] + HELPSTEER * 2
    data = write_jsonl(tmp_path / "hs.jsonl", rows)
    save_tiny_model_dir(tmp_path / "model")
    assert main(["rm", "train", "--set", f"model.path={tmp_path / 'model'}",
                 "--set", f"data.train={data}", "--set", "loss.name=regression",
                 "--set", "train.max_steps=1", "--set", f"output_dir={tmp_path / 'rm'}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1" in err and "'correctness'" in err
    assert not (tmp_path / "rm").exists()
