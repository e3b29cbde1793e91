"""The command line as a user runs it (on a tiny model directory)."""

import argparse
import os
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from preftune.cli import build_parser, main
from tiny_models import yes_no_workspace

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return yes_no_workspace(root, with_config=True)


def test_train_command_writes_a_loadable_model_and_run_record(files, capsys):
    code = main(["train", str(files / "config.yaml"), "--set", "objective.beta=0.2"])
    assert code == 0
    run = files / "run"
    AutoModelForCausalLM.from_pretrained(run / "model")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "lr", "grad_norm",
                "tokens_per_second", "padding_fraction"]:
        assert key in lines[0], key
    assert yaml.safe_load((run / "config.yaml").read_text())["objective"][0]["beta"] == 0.2
    assert json.loads((run / "data_report.json").read_text())["train"]["kept"] == 12


def test_a_run_saving_only_its_adapter_says_where_the_adapter_is(files, capsys):
    code = main(["train", str(files / "config.yaml"), "--set", f"output_dir={files / 'lora'}",
                 "--set", "model.lora={r: 4, alpha: 8, save_merged: false}"])
    assert code == 0
    assert (files / "lora" / "adapter").is_dir() and not (files / "lora" / "model").exists()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"done: adapter in {files / 'lora' / 'adapter'}, metrics in "
        f"{files / 'lora' / 'metrics.jsonl'}")


def test_bad_config_key_is_a_clear_error(files, capsys):
    code = main(["train", str(files / "config.yaml"), "--set", "train.lr=1e-3"])
    assert code == 2
    assert "unknown key 'train.lr'" in capsys.readouterr().err


def test_bad_data_names_file_line_and_field(files, capsys):
    bad = files / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    code = main(["train", str(files / "config.yaml"), "--set", f"data.train={bad}",
                 "--set", f"output_dir={files / 'badrun'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl" in err and "2" in err and "rejected" in err


def test_lora_without_peft_says_what_to_install(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails as if not installed
    code = main(["train", str(files / "config.yaml"), "--set", "model.lora.r=4",
                 "--set", f"output_dir={files / 'nopeft'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (  # before anything loads
        f"error: invalid configuration in {files / 'config.yaml'}:\n"
        "  model.lora needs the peft package: pip install 'preftune[lora]'")


def test_data_inspect_shows_counts_and_the_boundary(files, capsys):
    assert main(["data", "inspect", str(files / "pairs.jsonl"), "--model",
                 str(files / "model"), "--example", "3"]) == 0
    out = capsys.readouterr().out
    assert "records read        12" in out and "prompt | response" in out
    assert "pairs.jsonl:4" in out  # record 3 is line 4


def test_data_inspect_reads_renamed_columns_with_column(files, tmp_path, capsys):
    rows = [json.loads(line) for line in (files / "pairs.jsonl").read_text().splitlines()]
    names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({names.get(k, k): v for k, v in row.items()}) + "\n"
                               for row in rows))
    assert main(["data", "inspect", str(files / "pairs.jsonl"), "--model",
                 str(files / "model"), "--example", "3"]) == 0
    plain = capsys.readouterr().out
    assert main(["data", "inspect", str(renamed), "--model", str(files / "model"),
                 "--example", "3", *[f"--column={k}={v}" for k, v in names.items()]]) == 0
    mapped = capsys.readouterr().out
    assert "records read        12" in mapped and "'question' + 'good'/'bad' responses" in mapped

    def rest(text, folder):  # all but the layout line, which names the file's own columns
        return [line.replace(str(folder), "").replace("renamed.jsonl", "pairs.jsonl")
                for line in text.splitlines() if "responses (shape detected" not in line]

    assert rest(mapped, tmp_path) == rest(plain, files)
    prompts = tmp_path / "prompts.jsonl"  # a prompts file under another column name
    prompts.write_text('{"text": "a red circle"}\n{"text": "a blue square"}\n')
    assert main(["data", "inspect", str(prompts), "--model", str(files / "model"),
                 "--column", "prompt=text"]) == 0
    assert "records             2" in capsys.readouterr().out
    # columns a prompts file has besides the prompt are named: responses under an unknown
    # name (Nectar's answers) would otherwise be missed without a word
    prompts.write_text('{"prompt": "q", "answers": [{"answer": "a", "rank": 1}]}\n')
    assert main(["data", "inspect", str(prompts), "--model", str(files / "model")]) == 0
    assert "not read            answers (if a column holds responses, name it with --column, " \
        "e.g. responses=COLUMN)" in capsys.readouterr().out


def test_data_inspect_counts_records_missing_a_rating(files, tmp_path, capsys):
    """A rating that a later row leaves out or writes as words is counted, with its first
    record: rm train refuses those records, so inspect is where a user should learn of them."""
    path = tmp_path / "rated.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "helpfulness": i % 5, "correctness": 3}
            for i in range(6)]
    rows[4]["helpfulness"] = "good"
    del rows[5]["helpfulness"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["data", "inspect", str(path), "--model", str(files / "model")]) == 0
    out = capsys.readouterr().out
    assert "scores              correctness, helpfulness" in out
    assert f"  no helpfulness    2  (absent or not a number, first {path}:5;" in out
    assert "no correctness" not in out


def test_data_inspect_shows_a_prompts_file(files, tmp_path, capsys):
    """Prompt-only records (what `preftune online` and spo sample from) are counted and
    rendered as the online run reads them (a system column opens the prompt), each distinct
    prompt with its token count as generation renders it."""
    from preftune.data.tokenize import TokenizeSettings
    from preftune.generation import prompt_ids
    from preftune.model.load import load_tokenizer

    rows = [{"prompt": "a red circle", "system": ""},
            {"prompt": "What is 2+2?", "system": "Be brief."},
            {"prompt": "a red circle", "system": ""}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "What is 2+2?",
                                                             "system": "Be brief."}) + "\n"
                    + json.dumps({"prompt": "a red circle"}) + "\n")
    # a system field on some records only: text prompts and conversations, refused by record
    assert main(["data", "inspect", str(path), "--model", str(files / "model")]) == 2
    assert f"{path}:3: field 'prompt' is text, and the first prompt ({path}:1) is a message " \
        "list; write every prompt one way." in capsys.readouterr().err
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["data", "inspect", str(path), "--model", str(files / "model"),
                 "--example", "1"]) == 0
    out = capsys.readouterr().out
    seen = [[{"role": "user", "content": "a red circle"}],
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "What is 2+2?"}]]
    lengths = [len(ids) for ids in prompt_ids(seen, load_tokenizer(str(files / "model")),
                                              TokenizeSettings(1024, None))]
    assert "records             3" in out and "distinct prompts    2" in out
    assert f"{min(lengths)} / {sum(lengths) / 2:.1f} / {max(lengths)}" in out
    assert f"prompt 1 ({path}:2), {lengths[1]} tokens\n  {seen[1]!r}" in out
    assert "not read" not in out
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    assert main(["data", "inspect", str(path), "--model", str(files / "model")]) == 2
    assert f"{path}:2: field 'prompt' (the prompt) is missing or empty; a prompts file " \
           "holds one prompt per record" in capsys.readouterr().err
    assert main(["data", "inspect", str(path), "--model", str(files / "model"),
                 "--max-length", "1"]) == 2
    assert "error: --max-length 1: at least 2 (a prompt token and a response token)." in \
        capsys.readouterr().err
    path.write_text('{"prompt": "a"}\n{"prompt": 5}\n')
    assert main(["data", "inspect", str(path), "--model", str(files / "model")]) == 2
    assert f"{path}:2: field 'prompt' is int 5; a prompt is a string or a list of chat " \
           "messages." in capsys.readouterr().err


def test_objectives_lists_every_registered_objective(capsys):
    from preftune.objectives import REGISTRY

    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    for name, spec in REGISTRY.items():
        assert name in out and spec.paper in out
    rows = [line for line in out.splitlines() if line and not line.startswith(" ")]
    starts = {line.index(REGISTRY[line.split()[0]].paper) for line in rows}
    assert len(starts) == 1  # the paper column lines up, the longest (cdpo's URL) included
    mdpo = next(line for line in rows if line.startswith("mdpo "))
    assert "reference, images with negatives " in mdpo  # what its data must carry


def test_docs_objectives_md_is_current():
    from preftune.objectives.catalog import markdown

    checked_in = (REPO / "docs" / "objectives.md").read_text()
    assert checked_in == markdown(), (
        "docs/objectives.md is stale: run `preftune objectives --markdown > docs/objectives.md`")


def test_every_example_file_the_readme_names_exists():
    named = set(re.findall(r"examples/[\w/.-]+\.(?:yaml|py)", (REPO / "README.md").read_text()))
    assert "examples/dpo.yaml" in named
    assert sorted(name for name in named if not (REPO / name).is_file()) == []


def test_the_readme_layout_names_every_module():
    """Each module under src/preftune is named in its folder's lines of "Layout of the code"
    (the objective families are "one module per family")."""
    from preftune.objectives import REGISTRY

    layout = (REPO / "README.md").read_text().split("## Layout of the code")[1].split("```")[1]
    folders, folder = {}, ""
    for line in layout.splitlines():
        found = re.match(r"  (\w+)/\s", line)
        folder = found.group(1) if found else folder
        folders[folder] = folders.get(folder, "") + line + "\n"
    families = {spec.fn.__module__.rsplit(".", 1)[1] for spec in REGISTRY.values()
                if spec.fn.__module__.startswith("preftune.objectives.")}
    missing = []
    for path in sorted((REPO / "src" / "preftune").rglob("*.py")):
        relative = path.relative_to(REPO / "src" / "preftune")
        folder = relative.parts[0] if len(relative.parts) > 1 else ""
        if path.stem in ("__init__", "__main__") or (folder == "objectives" and
                                                     path.stem in families):
            continue
        if not re.search(rf"(?<![\w.]){path.stem}(?!\w)", folders.get(folder, "")):
            missing.append(str(relative))
    assert missing == []


def all_parsers(parser, path=()):
    """(command path, parser) for the top level and every command and subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def test_every_command_help_ends_with_examples_that_run_that_command():
    from preftune.cli import build_parser

    parsers = dict(all_parsers(build_parser()))
    assert {("train",), ("online",), ("rm", "train"), ("rm", "eval"), ("rm", "score"),
            ("rm", "losses"), ("demo",), ("eval",), ("data", "inspect"),
            ("data", "synthetic"), ("objectives",), ("report",), ("compare",),
            ("config", "explain"), ("config", "schema")} <= set(parsers)
    for path, parser in parsers.items():
        help_text = parser.format_help()
        parts = re.split(r"\nexamples?:\n", help_text)
        assert len(parts) == 2, path
        examples = [line.strip() for line in parts[1].splitlines() if line.strip()]
        assert examples, path
        for example in examples:
            words = shlex.split(example)
            assert words[0] == "preftune" and words[1 : 1 + len(path)] == list(path), example
            for word in words:  # a shipped config it names exists
                if word.startswith("examples/"):
                    assert (REPO / word).is_file(), example
            args = build_parser().parse_args(words[1:])  # a valid invocation of that command
            chosen = (args.command, getattr(args, "rm_command", None)
                      or getattr(args, "data_command", None)
                      or getattr(args, "diffusion_command", None)
                      or getattr(args, "config_command", None))
            assert tuple(name for name in chosen if name)[: len(path)] == path, example


def test_a_launched_process_ends_after_its_group_without_the_interpreter_teardown(tmp_path):
    """Under a launcher, ``main`` leaves the process group and ends the process with its code
    and its output flushed, skipping the teardown where a gloo thread that outlived the group
    could abort the process (seen under DeepSpeed ZeRO-3)."""
    script = tmp_path / "launched.py"
    script.write_text(
        "import atexit\n"
        "import torch.distributed as dist\n"
        "from preftune.cli import main\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "atexit.register(print, 'interpreter teardown ran')\n"
        "main(['objectives'])\n"
        "print('main returned')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dpo" in done.stdout.split()  # the listing, flushed before the process ended
    assert "main returned" not in done.stdout
    assert "interpreter teardown ran" not in done.stdout


def test_version_names_preftune_torch_transformers_and_python(capsys):
    """The installed distributions' versions (PyPI's CUDA wheel of torch says 2.9.0 where
    torch.__version__ says 2.9.0+cu128), read without importing them."""
    import platform
    from importlib.metadata import version

    import preftune

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"preftune {preftune.__version__} (torch {version('torch')}, transformers "
        f"{version('transformers')}, Python {platform.python_version()})")


def test_deepspeed_imported_on_a_cpu_machine_does_not_warn_after_a_command():
    pytest.importorskip("deepspeed")
    done = subprocess.run([sys.executable, "-c",
                           "import logging, torch\n"
                           "from preftune.cli import main\n"
                           "main(['objectives']); main(['objectives'])\n"
                           "import deepspeed\n"
                           "print(len(logging.getLogger('DeepSpeed').filters))\n"
                           "logging.getLogger('DeepSpeed').warning('another warning')"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr  # (DeepSpeed logs to stdout)
    assert printed.splitlines()[-2] == "1"  # one filter, however many commands ran
    assert "Setting accelerator to CPU" not in printed
    assert printed.splitlines()[-1].endswith("another warning")  # the others still show


@pytest.mark.parametrize("argv, option", [
    (["rm", "eval", "--model", "m", "--data", "d", "--bins", "0"], "--bins"),
    (["rm", "score", "--model", "m", "--data", "d", "--output", "o", "--batch-size", "0"],
     "--batch-size"),
    (["eval", "--model", "m", "--data", "d", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["compare", "--objectives", "dpo", "--samples", "-1"], "--samples"),
])
def test_counts_out_of_range_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert f"argument {option}: must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "m", "--data", "d", "--output", "FILE"], "--output FILE is a file"),
    (["rm", "eval", "--model", "m", "--data", "d", "--output", "FILE"],
     "--output FILE is a file"),
    (["rm", "score", "--model", "m", "--data", "d", "--output", "DIR", "--overwrite"],
     "--output DIR is a folder; name the file to write in it (e.g. DIR/output.jsonl)"),
    (["compare", "--objectives", "dpo", "--output-dir", "FILE"], "--output-dir FILE is a file"),
    (["eval", "--model", "m", "--data", "d", "--output", "NEW/eval.json"],
     "--output NEW/eval.json names the folder the results are written into (its files have "
     "their own names), not a file: give a folder, e.g. NEW/eval."),
    (["compare", "--objectives", " , "], "--objectives names no objective"),
    (["compare", "--objectives", "dpo,ipo,dpo"], "--objectives names dpo more than once"),
    (["rm", "score", "--model", "m", "--data", "d", "--output", "o", "--field", "origin"],
     "--field 'origin': name the column to write"),  # (it overwrote the origin column)
    (["rm", "strength", "--model", "m", "--model", "n", "--data", "d", "--output", "o",
      "--field", ""], "--field '': name the column to write"),
])
def test_outputs_of_the_wrong_kind_and_empty_lists_are_refused_before_any_work(
        argv, message, tmp_path, capsys):
    """eval's and rm eval's --output and compare's --output-dir are folders, rm score's
    --output a file: the other kind is refused before anything loads (it was found after
    the work, with a traceback), and the file or folder is left as it was; compare refuses an
    empty or repeating objective list (an empty one wrote an empty leaderboard over the
    last); rm score and strength refuse a --field that is empty or the origin they write."""
    (tmp_path / "FILE").write_text("kept")
    (tmp_path / "DIR").mkdir()
    argv = [str(tmp_path / a) if a.split("/")[0] in ("FILE", "DIR", "NEW") else a
            for a in argv]
    assert main(argv) == 2
    assert message.replace("FILE", str(tmp_path / "FILE")).replace(
        "DIR", str(tmp_path / "DIR")).replace("NEW", str(tmp_path / "NEW")) \
        in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["DIR", "FILE"]
    assert (tmp_path / "FILE").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "FILE"]


def test_data_synthetic_never_replaces_other_data_unasked(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["data", "synthetic", "--output-dir", str(out), "--train", "4", "--eval", "2"]
    assert main(args) == 0
    written = (out / "train.jsonl").read_text()
    assert len(written.splitlines()) == 4 and len((out / "eval.jsonl").read_text().splitlines()) == 2
    assert main(args) == 0  # the same data again: nothing to lose
    (out / "train.jsonl").write_text('{"prompt": "mine", "chosen": "a", "rejected": "b"}\n')
    assert main(args) == 2
    assert "train.jsonl exists with other contents" in capsys.readouterr().err
    assert (out / "train.jsonl").read_text().startswith('{"prompt": "mine"')
    assert main(args + ["--overwrite"]) == 0 and (out / "train.jsonl").read_text() == written
    (tmp_path / "afile").write_text("x")
    assert main(["data", "synthetic", "--output-dir", str(tmp_path / "afile"), "--train", "2"]) == 2
    assert "afile is a file; it names the folder the results are written into" in \
        capsys.readouterr().err
    assert main(["data", "synthetic", "--output-dir", str(tmp_path / "no-eval"), "--train", "2",
                 "--eval", "0"]) == 0
    assert not (tmp_path / "no-eval" / "eval.jsonl").exists()
    # a split without held-out pairs beside an earlier run's eval.jsonl, which would pass for
    # its own: refused, or removed with --overwrite
    no_eval = ["data", "synthetic", "--output-dir", str(out), "--train", "4", "--eval", "0"]
    (out / "train.jsonl").unlink()
    assert main(no_eval) == 2
    assert (f"{out / 'eval.jsonl'} exists with other contents; choose another --output-dir or "
            "pass --overwrite to remove it (this run writes none)." in capsys.readouterr().err)
    assert main(no_eval + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
    (out / "eval.jsonl").mkdir()  # a folder where a file goes: named, even with --overwrite
    assert main(["data", "synthetic", "--output-dir", str(out), "--train", "4", "--eval", "2",
                 "--overwrite"]) == 2
    assert f"{out / 'eval.jsonl'} is a folder where this file goes" in capsys.readouterr().err


def test_a_reader_that_stops_early_gets_no_traceback():
    """`preftune config explain | head -1`: the pipe is closed under the writer (here before it
    writes at all, so that every write fails, whatever the timing)."""
    process = subprocess.Popen([sys.executable, "-m", "preftune", "config", "explain"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("how,code,name", [("sigterm", 143, "SIGTERM"),
                                           ("ctrl-c", 130, "SIGINT (Ctrl-C)")])
def test_a_signal_outside_the_training_steps_ends_with_a_message(files, capsys, monkeypatch,
                                                                 how, code, name):
    """During the reference pass (or a final save, sampling ...): no traceback and no silent
    death, but the signal's exit code and what to do."""
    import signal

    from preftune.train import loop

    def interrupted(*args, **kwargs):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_reference", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", str(files / "config.yaml"), "--set",
                 f"output_dir={files / ('stopped-' + how)}"]) == code
    assert capsys.readouterr().err.endswith(
        f"\nstopped by {name}; what was written is kept. Run the same command again; if it says "
        "its folder holds a run, add --resume to continue from what was written (the last "
        "checkpoint, the finished rounds) or --overwrite to start over.\n")
    # a command without --resume is only told to run again
    monkeypatch.setattr("preftune.data.synthetic.generate_split", interrupted)
    assert main(["data", "synthetic", "--output-dir", str(files / "syn")]) == code
    assert capsys.readouterr().err.endswith(
        f"\nstopped by {name}; what was written is kept. Run the same command again.\n")
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone


def test_every_option_has_help_and_shows_its_default(capsys):
    undocumented = [(" ".join(path), action.option_strings)
                    for path, parser in all_parsers(build_parser())
                    for action in parser._actions if action.option_strings and not action.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS longest sampled or greedy answer, in tokens " \
           "(default: 64)" in text
    assert "--samples SAMPLES policy samples per prompt for KL, top-k and length stats (0: " \
           "skip) (default: 4)" in text
    assert "--output OUTPUT output dir (default: the run dir, else the cwd) " in text  # said
