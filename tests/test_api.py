"""The Python API (``preftune.api``): the same runs as the command line, configs from dicts with
the CLI's messages, and objectives and scorers from user code (decorator, module:function,
installed entry points), on a tiny model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from forked_python import run_python
from safetensors.torch import load_file

import preftune
from preftune import api
from preftune.cli import main
from preftune.config_schema import json_schema
from tiny_models import yes_no_workspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return yes_no_workspace(root, with_config=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_api_train_gives_the_same_weights_as_the_cli(files):
    config = files / "config.yaml"
    assert main(["train", str(config), "--set", f"output_dir={files / 'by_cli'}"]) == 0
    run_dir = api.train(api.Config.from_yaml(config, [f"output_dir={files / 'by_api'}"]),
                        show_progress=False)
    assert run_dir == files / "by_api"
    by_cli = load_file(files / "by_cli" / "model" / "model.safetensors")
    by_api = load_file(files / "by_api" / "model" / "model.safetensors")
    initial = load_file(files / "model" / "model.safetensors")
    assert by_cli.keys() == by_api.keys()
    assert all(torch.equal(by_cli[name], by_api[name]) for name in by_cli)
    assert any(not torch.equal(by_api[name], initial[name]) for name in initial)
    assert [m["loss"] for m in _metrics(files / "by_cli")] == \
        [m["loss"] for m in _metrics(files / "by_api")]


def test_show_progress_false_draws_no_bar_the_reference_pass_included(files, tmp_path,
                                                                       capsys):
    """(The step bar was off, and the reference pass before it still drew its own.)"""
    for shown in (False, True):
        api.train(api.Config.from_yaml(files / "config.yaml", [
            f"output_dir={tmp_path / str(shown)}", "train.max_steps=1",
            f"reference.cache_dir={tmp_path / f'cache-{shown}'}"]), show_progress=shown)
        err = capsys.readouterr().err
        assert ("reference logps (train)" in err) == shown
        assert ("train dpo" in err) == shown


def test_from_dict_and_from_yaml_give_the_cli_errors(files, capsys):
    tree = yaml.safe_load((files / "config.yaml").read_text())
    tree["train"]["learning_rat"] = 1.0
    with pytest.raises(api.ConfigError) as from_dict:
        api.Config.from_dict(tree)
    assert "learning_rat" in tree["train"]  # the caller's dict is left as it was
    bad = files / "bad.yaml"
    bad.write_text(yaml.safe_dump(tree))
    with pytest.raises(api.ConfigError) as from_yaml:
        api.Config.from_yaml(bad)
    assert main(["train", str(bad)]) == 2
    problem = ("unknown key 'train.learning_rat' in the config. Did you mean "
               "train.learning_rate?")
    assert problem in str(from_dict.value)
    assert str(from_yaml.value) == f"invalid configuration in {bad}:\n  {problem} Known keys: " \
        + str(from_dict.value).split(" Known keys: ")[1]
    assert str(from_yaml.value) in capsys.readouterr().err
    overridden = api.Config.from_dict({}, ["train.batch_size=3", "objective.beta=0.5"])
    assert overridden.train.batch_size == 3 and overridden.objective[0].model_extra == {"beta": 0.5}
    # one override as a bare string is one override, not a sequence of characters
    assert api.Config.from_dict({}, "train.batch_size=5").train.batch_size == 5
    assert api.Config.from_yaml(None, "train.batch_size=6").train.batch_size == 6
    with pytest.raises(api.ConfigError, match="unknown objective 'dpoo'"):  # not 'd'
        api.compare("dpo,dpoo", str(files / "config.yaml"), output_dir=str(files / "cmp"))


def test_options_of_the_api_functions_are_checked_in_their_own_names(tmp_path):
    """(An unknown option named an internal class, a string for a number was a TypeError deep
    in a comparison, and the CLI's ranges were not the API's.) Checked before any work."""
    with pytest.raises(TypeError, match=r"evaluate\(\) takes no option 'sampels'; did you mean "
                                        r"'samples'\? Its options: model, data"):
        api.evaluate("m", "d", sampels=4)
    with pytest.raises(TypeError, match=r"evaluate_reward_model\(\) takes no option 'bin'"):
        api.evaluate_reward_model("m", "d", bin=4)
    for call, message in (
            (lambda: api.tree_pairs("m", "d", "o", "s", branches="2"),
             r"tree_pairs\(\): branches should be a whole number of at least 1, got '2'"),
            (lambda: api.tree_pairs("m", "d", "o", "s", branches=1),
             r"tree_pairs\(\): tree search: branches 1: at least 2"),
            (lambda: api.relevance_pairs("d", "o", min_similarity="0.3"),
             r"relevance_pairs\(\): min_similarity should be a number, got '0.3'"),
            # what the commands' flags refuse (it was a KeyError after the models loaded, a
            # comparison's TypeError inside, a half-written file or another field's name)
            (lambda: api.evaluate("m", "d", dtype="bf16"),
             r"evaluate\(\): dtype should be one of auto, float32, bfloat16, float16, got "
             r"'bf16'"),
            (lambda: api.evaluate("m", "d", filter_top="0.1"),
             r"evaluate\(\): filter_top should be a number, got '0.1'"),
            (lambda: api.evaluate("m", "d", max_prompt_length=-5),
             r"evaluate\(\): max_prompt_length should be at least 1, got -5"),
            (lambda: api.evaluate_reward_model("m", "d", dtype="fp16"),
             r"evaluate_reward_model\(\): dtype should be one of"),
            (lambda: api.score_with_reward_model("m", "d", str(tmp_path / "s.jsonl"),
                                                 batch_size=0),
             r"score_with_reward_model\(\): batch_size should be at least 1, got 0"),
            (lambda: api.score_with_reward_model("m", "d", str(tmp_path / "s.jsonl"),
                                                 dtype="bf16"),
             r"score_with_reward_model\(\): dtype should be one of"),
            (lambda: api.preference_strength("m", "d", str(tmp_path / "p.jsonl"), passes="2"),
             r"preference_strength\(\): passes should be a whole number of at least 1, got '2'"),
            (lambda: api.fit_compositional("f", "d", str(tmp_path / "f.yaml"), l2="0.1"),
             r"fit_compositional\(\): l2 should be a number, got '0.1'"),
            (lambda: api.tree_pairs("m", "d", "o", "s", step_tokens=0),
             r"tree_pairs\(\): step_tokens should be at least 1, got 0"),
            (lambda: api.tree_pairs("m", "d", "o", "s", max_length=None),
             r"tree_pairs\(\): max_length should be a whole number of at least 1, got None"),
            (lambda: api.pairs_from_commits("repo", str(tmp_path / "c.jsonl"), max_commits=0),
             r"pairs_from_commits\(\): max_commits 0: at least 1")):
        with pytest.raises(api.ConfigError, match=message):
            call()
    with pytest.raises(TypeError, match=r"pairs_from_commits\(\) takes no option 'max_commit'"):
        api.pairs_from_commits("repo", str(tmp_path / "c.jsonl"), max_commit=3)
    assert not list(tmp_path.iterdir())


def test_a_config_of_another_kind_is_refused_naming_the_function_that_runs_it(files,
                                                                              tmp_path):
    """An OnlineConfig is a Config: train() trained it offline, its online section ignored,
    and wrote a config.yaml that no later --resume could read."""
    tree = {"output_dir": str(tmp_path / "online"), "data": {"train": "pairs.jsonl"},
            "online": {"rounds": 2, "scorer": "synthetic"}}
    with pytest.raises(TypeError, match=r"^train\(\) takes a Config, a dict or a YAML path, "
                                        r"got an OnlineConfig; call run_online\(config\) to "
                                        r"run it\.$"):
        api.train(api.OnlineConfig.from_dict(tree))
    with pytest.raises(TypeError, match=r"^train_reward_model\(\) takes a RewardConfig, .* got "
                                        r"a Config; call train\(config\) to run it\.$"):
        api.train_reward_model(api.Config.from_dict({"data": {"train": "pairs.jsonl"}}))
    assert not (tmp_path / "online").exists()


def test_paths_may_be_pathlib_paths_everywhere(files, tmp_path):
    """A ``pathlib.Path`` for a model, data or output is what the same string gives: in
    config dicts (at any depth) and in the functions' arguments (``evaluate`` ran the whole
    evaluation, then failed to write eval.json; a data Path failed in the reader)."""
    tree = yaml.safe_load((files / "config.yaml").read_text())
    as_paths = {**tree, "model": {"path": files / "model"},
                "data": {"train": [files / "pairs.jsonl"]}, "output_dir": tmp_path / "run"}
    assert api.Config.from_dict(as_paths) == api.Config.from_dict(
        {**tree, "model": {"path": str(files / "model")},
         "data": {"train": [str(files / "pairs.jsonl")]}, "output_dir": str(tmp_path / "run")})
    results = api.evaluate(files / "model", files / "pairs.jsonl", samples=0,
                           reference=files / "model", output=tmp_path / "eval")
    assert results == json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert results["pairs"] == 12
    with pytest.raises(api.ConfigError, match=r"Config.from_dict: expected a dict shaped like "
                                              r"the YAML file .*, got list"):
        api.Config.from_dict(["model"])
    with pytest.raises(api.ConfigError, match=r"compare\(\): config is the path of a YAML "
                                              r"file .* got Config"):
        api.compare("dpo", api.Config.from_dict(tree), output_dir=tmp_path / "cmp")


def test_rm_and_online_configs_read_the_same_ways():
    rm = api.RewardConfig.from_yaml(ROOT / "examples/rm/bt.yaml", ["loss.name=bt_margin"])
    assert rm.loss.name == "bt_margin"
    assert api.RewardConfig.from_dict({"loss": {"name": "gpm"}}).head.kind == "gpm"
    with pytest.raises(api.ConfigError, match="online.scorer is required"):
        api.OnlineConfig.from_dict({"data": {"train": "prompts.jsonl"}})
    online = api.OnlineConfig.from_yaml(ROOT / "examples/online/iterative_dpo_checkers.yaml")
    assert online.online.scorer == "synthetic"


USER_LOSSES = '''
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

import preftune


@dataclass
class HingeParams:
    beta: preftune.Positive = 0.1
    target: preftune.NonNegative = 1.0


@preftune.register_objective(params=HingeParams, needs_reference=True, data="pairs")
def soft_hinge(inputs, params):
    """softplus(target - (r_w - r_l)), r = beta * (log pi - log pi_ref)."""
    rewards = params.beta * (inputs.policy.logps - inputs.reference.logps)
    return preftune.ObjectiveOutput(F.softplus(params.target - rewards[:, 0] + rewards[:, 1]),
                                    rewards)


def not_registered(inputs, params):
    return None
'''


def test_a_user_objective_named_as_module_function_trains_from_the_cli(files, tmp_path,
                                                                      monkeypatch, registries):
    (tmp_path / "user_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_losses", raising=False)
    run = tmp_path / "run"
    assert main(["train", str(files / "config.yaml"), "--set", f"output_dir={run}",
                 "--set", "objective.name=user_losses:soft_hinge",
                 "--set", "objective.target=2.0"]) == 0
    first = _metrics(run)[0]
    # step 1: the policy is the reference, so every implied reward is 0: loss = softplus(2)
    assert first["loss"] == pytest.approx(math.log1p(math.exp(2.0)), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(first)
    saved = yaml.safe_load((run / "config.yaml").read_text())["objective"][0]
    assert saved == {"name": "user_losses:soft_hinge", "weight": 1.0, "target": 2.0}
    with pytest.raises(api.ConfigError, match=r"objective.target: Input should be greater than "
                                              r"or equal to 0 \(got -1\)"):
        api.Config.from_dict({"objective": {"name": "user_losses:soft_hinge", "target": -1}})
    with pytest.raises(api.ConfigError, match="objective.betta"):
        api.Config.from_dict({"objective": {"name": "user_losses:soft_hinge", "betta": 1}})
    with pytest.raises(api.ConfigError, match="'not_registered' is not a registered objective"):
        api.Config.from_dict({"objective": {"name": "user_losses:not_registered"}})
    with pytest.raises(api.ConfigError, match="expected module:function with an importable"):
        api.Config.from_dict({"objective": {"name": "no_such_module:loss"}})


def test_objective_registered_in_the_script_trains_by_name(files, registries):
    def define():
        @preftune.register_objective(needs_reference=False)
        def mean_logp_gap(inputs, params):
            """-(mean log pi(y_w) - mean log pi(y_l)), reference-free."""
            rewards = inputs.policy.mean_logps
            return preftune.ObjectiveOutput(rewards[:, 1] - rewards[:, 0], rewards)

        return mean_logp_gap

    define()
    gap = define()  # the same definition again (a notebook cell run twice) replaces it
    config = api.Config.from_yaml(files / "config.yaml", [
        f"output_dir={files / 'gap'}", "objective.name=mean_logp_gap"])
    assert config.reference_strategy == "none"  # the declaration drives the reference choice
    api.train(config, show_progress=False)
    first = _metrics(files / "gap")[0]
    assert first["loss"] == pytest.approx(-first["rewards/margins"], abs=1e-5)
    with pytest.raises(ValueError, match=r"^objective 'dpo' is built into preftune; register "
                                         r"yours under another name \(register_objective\("
                                         r"name=\.\.\.\) or rename mean_logp_gap\)\.$"):
        preftune.register_objective("dpo", needs_reference=True)(gap)

    def other():  # another function under a taken user name
        return None

    with pytest.raises(ValueError, match=r"^objective 'mean_logp_gap' is already registered "
                                         r"by test_api\..*define\.<locals>\.mean_logp_gap; "
                                         r"register yours under another name"):
        preftune.register_objective("mean_logp_gap", needs_reference=False)(other)


def _install_plugin(root: Path) -> None:
    """A package installed the way pip leaves one: its module and a dist-info with entry
    points."""
    (root / "pt_plugin.py").write_text(USER_LOSSES.replace("soft_hinge", "plugin_hinge") + '''

def first_letter_is_y(prompt, response):
    return float(response.startswith("y"))
''')
    info = root / "pt_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pt-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[preftune.objectives]\nplugin_hinge = pt_plugin:plugin_hinge\n\n"
        "[preftune.scorers]\nstarts_with_y = pt_plugin:first_letter_is_y\n")


def test_installed_entry_points_add_objectives_and_scorers(tmp_path, monkeypatch, registries,
                                                           capsys):
    _install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pt_plugin", raising=False)
    assert main(["objectives"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("plugin_hinge "))
    assert row.split()[:3] == ["plugin_hinge", "pairs", "reference"]
    assert "softplus(target - (r_w - r_l)), r = beta * (log pi - log pi_ref)." in listing
    config = api.Config.from_dict({"objective": {"name": "plugin_hinge", "target": 0.5}})
    assert config.reference_strategy == "precomputed"
    assert api.load_scorer("starts_with_y").score(["p", "p"], ["yes", "no"]) == [1.0, 0.0]
    names = [term["properties"]["name"].get("const")
             for term in json_schema("train")["$defs"]["ObjectiveConfig"]["anyOf"]
             if "properties" in term]  # (the others: a name alone, module:function)
    assert "plugin_hinge" in names and "dpo" in names


def test_a_broken_plugin_is_named_and_leaves_the_others_usable(tmp_path, monkeypatch,
                                                                registries, capsys):
    """One installed package whose entry points do not load (a missing module, a function it
    never registered, a name that is not its objective's) is named with what to do; the
    listing, the schema and every other objective still work."""
    _install_plugin(tmp_path)
    info = tmp_path / "pt_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pt-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[preftune.objectives]\ngone = pt_broken_nothere:fn\n"
        "plain = pt_plugin:first_letter_is_y\nalias_hinge = pt_plugin:plugin_hinge\n\n"
        "[preftune.scorers]\ngone_scorer = pt_broken_nothere:fn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pt_plugin", raising=False)
    assert main(["objectives"]) == 0
    out, err = capsys.readouterr()
    assert any(line.startswith("plugin_hinge ") for line in out.splitlines())
    assert ("warning: not listed: objective 'gone': entry point gone = pt_broken_nothere:fn of "
            "pt-broken (group preftune.objectives) does not load (ModuleNotFoundError: No "
            "module named 'pt_broken_nothere'); fix or reinstall pt-broken, or uninstall it."
            in err.splitlines())
    assert "'first_letter_is_y' is not a registered objective" in err
    assert ("objective 'alias_hinge': the installed entry point alias_hinge registers its "
            "function as objective 'plugin_hinge'; name them alike") in err
    assert "plugin_hinge" in json.dumps(json_schema("train"))
    assert "left out of the schema: objective 'gone'" in capsys.readouterr().err
    with pytest.raises(api.ConfigError, match="objective 'gone': entry point gone"):
        api.Config.from_dict({"objective": {"name": "gone"}})
    with pytest.raises(api.ConfigError, match="scorer 'gone_scorer': entry point gone_scorer = "
                                              "pt_broken_nothere:fn of pt-broken"):
        api.load_scorer("gone_scorer")


def test_register_scorer_names_a_function_for_eval_and_online(registries):
    @preftune.register_scorer("length_scorer")
    def length(prompt, response):
        return float(len(response))

    assert api.load_scorer("length_scorer").score(["a", "b"], ["xy", "xyz"]) == [2.0, 3.0]
    with pytest.raises(api.ConfigError, match="a registered scorer name"):
        api.load_scorer("no_such_scorer")


def test_top_level_names_are_the_api_and_import_preftune_stays_light():
    assert preftune._API_NAMES == set(api.__all__) - {"train", "evaluate", "compare"}
    assert preftune.Config is api.Config and preftune.register_objective is \
        api.register_objective
    probe = "import sys, preftune; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_example_script_trains_its_own_objective_and_evaluates(files, tmp_path):
    result = run_python(
        [str(ROOT / "examples/python_api.py"), "--model", str(files / "model"), "--steps", "2",
         "--output-dir", str(tmp_path / "out")], {"PREFTUNE_CACHE": str(tmp_path / "cache")},
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(tmp_path / "out" / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    # step 1: policy = reference, implied rewards 0, so the loss is softplus(target = 1.0)
    assert metrics[0]["loss"] == pytest.approx(math.log1p(math.e), abs=1e-5)
    assert "step 2: loss" in result.stdout and "reward accuracy" in result.stdout
    assert "win rate over the reference under says_yes" in result.stdout
    results = json.loads((tmp_path / "out" / "run" / "eval.json").read_text())
    assert results["settings"]["scorer"] == "says_yes" and results["pairs"] == 16


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_python_api_snippet_runs(files, tmp_path, monkeypatch, registries):
    snippet = _readme_section("Python API").split("```python\n", 1)[1].split("```", 1)[0]
    example = yaml.safe_load((ROOT / "examples/dpo.yaml").read_text())
    example["model"]["path"] = str(files / "model")  # the tiny model in place of SmolLM2
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "dpo.yaml").write_text(yaml.safe_dump(example))
    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no thanks"}
            for i in range(80)]
    (tmp_path / "my_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    metrics = _metrics(tmp_path / "runs" / "dpo")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # rewards 0 at step 1
    assert (tmp_path / "runs" / "dpo" / "model" / "model.safetensors").exists()


def test_readme_config_commands_run(tmp_path, monkeypatch, capsys):
    block = _readme_section("Python API").split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["preftune", "config"]] * len(commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main(command[1:]) == 0, command
    out = capsys.readouterr().out
    assert "train.learning_rate: float >= 0 = 1e-06" in out
    assert json.loads((tmp_path / "preftune.schema.json").read_text()) == json_schema("train")


def test_a_registered_objective_is_checked_when_declared_and_when_it_returns(registries):
    """Params that a config could not set are refused at registration; a return value that
    is not one loss per example is refused at the first call, naming the objective."""
    from dataclasses import dataclass

    import torch

    from preftune.model.forward import SequenceStats

    class NotADataclass:
        beta = 0.1

    @dataclass
    class TakesWeight:
        weight: float = 1.0

    @dataclass
    class NoDefault:
        beta: float

    for params, message in ((NotADataclass, "is not a dataclass"),
                            (TakesWeight, "parameter 'weight' is taken by the config term"),
                            (NoDefault, "parameter 'beta' has no default")):
        with pytest.raises((TypeError, ValueError), match=message):
            preftune.register_objective("checked", params=params, needs_reference=False)(
                lambda inputs, p: None)

    @preftune.register_objective(needs_reference=False)
    def per_response(inputs, params):
        return preftune.ObjectiveOutput(-inputs.policy.logps, inputs.policy.logps)

    from preftune.objectives import get_objective
    from preftune.objectives.registry import NoParams, ObjectiveInputs

    stats = SequenceStats(logps=torch.zeros(3, 2), token_counts=torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"objective 'per_response' returned losses of shape "
                                        r"\(3, 2\); an objective returns ObjectiveOutput\(losses="
                                        r"\[examples\] \(3,\)"):
        get_objective("per_response")(ObjectiveInputs(stats), NoParams())
