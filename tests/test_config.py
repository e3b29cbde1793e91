from pathlib import Path

import pytest

from preftune.config import ConfigError, build_config, load_config


@pytest.mark.parametrize("tree,expected", [
    ({"train": {"lerning_rate": 1e-6}}, "'train.lerning_rate'.*Did you mean train.learning_rate"),
    ({"objective": {"name": "dpo", "betta": 0.1}}, "'objective.betta'.*Did you mean objective.beta"),
    ({"objective": {"name": "dpoo"}}, "unknown objective 'dpoo'.*Did you mean dpo"),
    ({"objective": {"name": "SimPO"}}, r"unknown objective 'SimPO'. Did you mean simpo\?"),
    ({"train": {"batch_size": "eight"}}, "train.batch_size"),
    ({"objective": {"name": "dpo", "beta": "strong"}}, "objective.beta"),
    ({"modle": {}}, "unknown key 'modle'.*Did you mean model"),
    ({"data": {"convert": ["pairs:best_vs_wrost", "unpaired"]}},
     r"data.convert: unknown conversion 'pairs:best_vs_wrost'. Did you mean pairs:best_vs_worst"),
    ({"objective": []}, r"objective is an empty list; give one term \(\{name: dpo\}\)"),
])
def test_bad_keys_and_types_name_the_key(tree, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config(tree)


def test_switching_objective_by_name_drops_the_old_parameters(tmp_path, capsys):
    """simpo's beta is 20x dpo's: a file's parameters do not carry over to another objective
    named with --set (in whichever order its own parameters are set), and that is said."""
    from preftune.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("objective: {name: dpo, beta: 0.1}\ndata: {train: p.jsonl}\n")
    term = load_config(str(path), ["objective.name=simpo"]).objective[0]
    assert (term.name, term.model_extra) == ("simpo", {})
    assert capsys.readouterr().err == (
        "note: --set objective.name=simpo replaces dpo; its parameters from the config "
        "(beta=0.1) are dropped (set simpo's with --set objective.KEY=VALUE)\n")
    term = load_config(str(path), ["objective.beta=3", "objective.name=simpo"]).objective[0]
    assert term.model_extra == {"beta": 3}
    assert load_config(str(path), ["objective.name=dpo"]).objective[0].model_extra == \
        {"beta": 0.1}  # the same name: nothing changes
    path.write_text("objective: dpo\ndata: {train: p.jsonl}\n")  # a name alone
    assert load_config(str(path), ["objective.name=ipo"]).objective[0].name == "ipo"
    with pytest.raises(ConfigError, match="unknown key 'objective.beta' in objective sft. It "
                                          "takes no parameters."):
        build_config({"objective": {"name": "sft", "beta": 0.1}})
    with pytest.raises(ConfigError, match="objective item 2 of 2: unknown key "
                                          "'objective.wieght' in objective sft. Did "
                                          "you mean objective.weight?"):
        build_config({"objective": [{"name": "dpo"}, {"name": "sft", "wieght": 0.2}]})
    with pytest.raises(ConfigError) as raised:  # which term of several, however it is wrong
        build_config({"objective": [{"name": "dpo", "beta": 0.1}, {"name": "ipo", "beta": -1},
                                    {"name": "sft", "weight": "x"}]})
    assert str(raised.value).splitlines()[1:] == [
        "  objective item 2 of 3: objective.beta: Input should be greater than 0 (got -1)",
        "  objective item 3 of 3: objective.weight: Input should be a valid number, unable to "
        "parse string as a number (got 'x')"]
    with pytest.raises(ConfigError, match=r"configuration in the config:\n  objective.beta: "):
        build_config({"objective": [{"name": "ipo", "beta": -1}]})  # one term: no item named
    assert build_config({"objective": "ipo"}).objective[0].name == "ipo"  # a name alone


@pytest.mark.parametrize("tree,expected", [
    ({"objective": {"name": "simpo"}, "reference": {"strategy": "precomputed"}}, "reference-free"),
    ({"reference": {"strategy": "adapter-off"}}, "needs model.lora"),
    ({"reference": {"strategy": "none"}}, "needs a reference"),
    ({"train": {"eval_every": 10}}, "eval_every does nothing"),
    ({"objective": [{"name": "dpo"}, {"name": "dpo", "beta": 0.5}]},
     "objective dpo appears twice in the list"),
    ({"objective": [{"name": "dpo"}, {"name": "sft", "weight": -1}]},
     "objective weights must be above 0"),
    ({"objective": {"name": "kto"}, "data": {"curriculum": True}},
     "data.curriculum orders pairs by their score gap; kto trains on unpaired data. Remove it."),
    ({"train": {"checkpoint_every": 2}},
     "train.checkpoint_every: 2 does nothing without train.gradient_checkpointing: true"),
    ({"data": {"max_length": 128, "max_prompt_length": 256}},
     r"data.max_prompt_length \(256\) must be below data.max_length \(128\) .* lower it too, "
     "e.g. --set data.max_prompt_length=64"),
    ({"data": {"max_length": 1}}, r"data.max_length: Input should be greater than or equal to "
                                  r"2 \(got 1\)"),  # (a prompt and a response token)
    ({"data": {"eval": "e.jsonl", "eval_fraction": 0.1}},
     r"set data.eval or data.eval_fraction, not both .data.eval_fraction: 0 turns the split "
     r"off, e.g. --set data.eval_fraction=0\)"),
])
def test_settings_that_would_do_nothing_are_errors(tree, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config(tree)


def test_settings_of_a_feature_that_is_off_are_refused_unless_left_at_their_default():
    """compile_mode without compile, tracker settings without a tracker; a value equal to the
    default (as a saved config.yaml holds every key) is no setting."""
    for train, key, needs in (({"compile_mode": "max-autotune"}, "compile_mode",
                               "train.compile: true"),
                              ({"tracking_dir": "t"}, "tracking_dir", "a tracker in "
                               "train.report_to"),
                              ({"run_name": "r"}, "run_name", "a tracker in train.report_to")):
        with pytest.raises(ConfigError) as error:
            build_config({"train": train})
        assert str(error.value).endswith(f"train.{key} does nothing without {needs}; remove "
                                         "it, or set what it needs.")
    assert build_config({"train": {"compile_mode": "default", "run_name": None}})
    assert build_config({"train": {"compile": True, "compile_mode": "max-autotune"}})


def test_online_and_reward_settings_of_what_is_off_are_refused():
    from preftune.online.config import OnlineConfig
    from preftune.reward.config import RewardConfig

    data = {"train": "p.jsonl"}
    online = {"data": data, "online": {"scorer": "synthetic", "pairs": {"rso_beta": 1.0}}}
    with pytest.raises(ConfigError, match=r"online.pairs.rso_beta does nothing with builder "
                                          r"best_vs_worst \(it is for builder rso\)"):
        OnlineConfig.from_dict(online)
    OnlineConfig.from_dict({"data": data, "online": {
        "scorer": "synthetic", "pairs": {"builder": "rso", "rso_beta": 1.0}}})
    with pytest.raises(ConfigError, match=r"online.sampling.vllm_memory does nothing with "
                                          r"backend hf"):
        OnlineConfig.from_dict({"data": data, "online": {"scorer": "synthetic",
                                                         "sampling": {"vllm_memory": 0.5}}})
    tree = {"data": {"train": "d.jsonl"}, "model": {"head": {"tau": 0.5}}}
    with pytest.raises(ConfigError, match=r"model.head.tau does nothing for a scalar head \(it "
                                          r"is for the gpm head\)"):
        RewardConfig.from_dict(tree)
    RewardConfig.from_dict({**tree, "loss": {"name": "gpm"}})
    tree["model"]["head"] = {"quantiles": [0.1, 0.9]}
    with pytest.raises(ConfigError, match=r"model.head.quantiles does nothing for a scalar "
                                          r"head \(it is for the quantile head\)"):
        RewardConfig.from_dict(tree)


def test_cuda_graphs_and_checkpointing_are_refused_together():
    """A checkpointed layer's compiled call without gradients would start a new CUDA-graph
    iteration and reuse the memory backward still needs; compile's default mode is fine."""
    train = {"compile": True, "compile_mode": "reduce-overhead", "gradient_checkpointing": True}
    with pytest.raises(ConfigError, match="train.compile_mode: reduce-overhead .CUDA graphs. does "
                                          "not combine with train.gradient_checkpointing"):
        build_config({"train": train})
    assert build_config({"train": {**train, "compile_mode": "default"}}).train.compile
    assert build_config({"train": {**train, "gradient_checkpointing": False}}).train.compile


@pytest.mark.parametrize("max_length,prompt_limit", [(1024, 512), (2048, 512), (513, 512),
                                                     (512, 256), (256, 128), (3, 1)])
def test_an_unset_prompt_limit_follows_a_lowered_max_length(max_length, prompt_limit):
    data = build_config({"data": {"max_length": max_length}}).data
    assert data.max_prompt_length == prompt_limit
    assert build_config({}).data.max_prompt_length == 512
    # a prompt limit that was set is kept, and null stays null
    assert build_config({"data": {"max_length": 256, "max_prompt_length": 200}}
                        ).data.max_prompt_length == 200
    assert build_config({"data": {"max_length": 256, "max_prompt_length": None}}
                        ).data.max_prompt_length is None


def test_reference_strategy_defaults_follow_the_objective():
    assert build_config({}).reference_strategy == "precomputed"
    assert build_config({"objective": {"name": "simpo"}}).reference_strategy == "none"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  name: dpo\n  beta: 0.2\ntrain:\n  batch_size: 2\n")
    config = load_config(str(path), ["train.batch_size=4", "objective.beta=0.05",
                                     "model.lora.r=8"])
    assert config.train.batch_size == 4
    assert config.objective[0].model_extra["beta"] == 0.05
    assert config.model.lora.r == 8
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(str(path), ["train.batch_size"])
    # `x:` alone reads as a mapping in YAML; a value ending in a colon is its text
    from preftune.config_tree import set_dotted

    tree = {}
    set_dotted(tree, "online.scorer", "judge:")
    set_dotted(tree, "model.lora", "{r: 4}")  # a mapping written as one stays one
    assert tree == {"online": {"scorer": "judge:"}, "model": {"lora": {"r": 4}}}
    with pytest.raises(ConfigError, match="missing.yaml does not exist .relative paths start "
                       "at .*every key can come from --set"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder, not a file"):
        load_config(str(tmp_path))


def test_every_example_config_is_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(str(path))


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    config = load_config(str(path))
    assert config.objective and config.data.train


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/rm/*.yaml")),
                         ids=lambda p: p.name)
def test_reward_model_example_configs_are_valid(path):
    from preftune.reward.config import load_reward_config
    from preftune.reward.losses import get_reward_loss

    config = load_reward_config(str(path))
    assert config.data.train and config.head.kind in get_reward_loss(config.loss.name).heads


def test_the_helpsteer_recipe_starts_scaled_bt_from_the_model_regression_trains():
    """README's HelpSteer2-Preference recipe: the second config reads the first one's model."""
    from preftune.model.adapter_dirs import final_model_dir
    from preftune.reward.config import load_reward_config

    examples = Path(__file__).parent.parent / "examples" / "rm"
    regression = load_reward_config(str(examples / "helpsteer_regression.yaml"))
    scaled = load_reward_config(str(examples / "helpsteer_scaled_bt.yaml"))
    assert scaled.model.path == str(final_model_dir(Path(regression.output_dir)))


def test_command_line_prompt_limits_follow_the_config_rule():
    """eval and data inspect cut prompts as training would: unset, 512, or half of a
    max_length of 512 or less; a limit that leaves no room for the response is refused."""
    from preftune.config import DataConfig, prompt_limit

    for length in (20, 512, 1024):
        assert prompt_limit(length, None) == DataConfig(max_length=length).max_prompt_length
    assert prompt_limit(20, None) == 10 and prompt_limit(1024, None) == 512
    assert prompt_limit(20, 5) == 5
    with pytest.raises(ConfigError, match=r"--max-prompt-length \(30\) must be below "
                                          r"--max-length \(20\)"):
        prompt_limit(20, 30)


def test_a_value_that_fits_no_member_of_a_union_is_one_line_of_keys():
    """data.train is a path or a list of them: pydantic tags each member (data.train.str,
    data.train.list[str]); the message names the key once, with what each member wanted."""
    with pytest.raises(ConfigError) as error:
        build_config({"data": {"train": {"foo": 1}}, "train": {"batch_size": "abc"}})
    assert str(error.value).split("\n")[1:] == [
        "  data.train: Input should be a valid string or a valid list (got {'foo': 1})",
        "  train.batch_size: Input should be a valid integer, unable to parse string as an "
        "integer (got 'abc')"]


def test_held_out_settings_without_held_out_data_say_how_to_turn_them_off():
    """eval_every: 0 is out of range, so the message names what does turn it off."""
    with pytest.raises(ConfigError, match=r"train.eval_every does nothing without data.eval or "
                                          r"data.eval_fraction: add held-out data, or turn it "
                                          r"off \(--set train.eval_every=null\)"):
        build_config({"data": {"train": "p.jsonl"}, "train": {"eval_every": 50}})
