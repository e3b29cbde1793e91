"""``preftune config schema`` (a JSON schema editors use) and ``preftune config explain`` (every
key with its type, default and help)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from preftune.cli import main
from preftune.config_schema import config_class, explain, json_schema

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION_ONLINE, SPM = ["online_rank_dpo.yaml"], ["spm.yaml"]
KINDS = {"train": ["examples/*.yaml", "examples/vision/*.yaml"], "rm": ["examples/rm/*.yaml"],
         "online": ["examples/online/*.yaml"], "diffusion": ["examples/diffusion/*.yaml"],
         "diffusion-online": ["examples/diffusion/online_*.yaml"],
         "diffusion-spm": ["examples/diffusion/spm.yaml"]}


def examples(kind: str) -> list[Path]:
    files = sorted(file for pattern in KINDS[kind] for file in ROOT.glob(pattern))
    if kind == "diffusion":  # the other two diffusion commands' configs
        files = [f for f in files if f.name not in DIFFUSION_ONLINE + SPM]
    return files


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("kind", KINDS)
def test_every_example_config_validates_against_its_schema(kind):
    """Both checks agree on every shipped example: the schema and the loader."""
    validator = _validator(kind)
    files = examples(kind)
    assert files
    for file in files:
        errors = [error.message for error in validator.iter_errors(yaml.safe_load(file.read_text()))]
        assert errors == [], file
        config_class(kind).from_yaml(str(file))


def test_diffusion_schemas_list_the_diffusion_objectives_and_refuse_a_bad_one():
    validator = _validator("diffusion")
    assert list(validator.iter_errors({"objective": {"name": "mapo", "snr_value": 0.2}})) == []
    assert list(validator.iter_errors({"objective": {"name": "mapo", "snr_value": 0}})) != []
    assert list(validator.iter_errors({"objective": {"name": "dpo"}})) != []  # text only
    assert "spo" in json.dumps(json_schema("diffusion-online"))


@pytest.mark.parametrize("tree, problem", [
    ({"train": {"lr": 1e-6}}, "Additional properties are not allowed ('lr' was unexpected)"),
    ({"train": {"batch_size": 0}}, "0 is less than the minimum of 1"),
    ({"reference": {"strategy": "frozen"}}, "'frozen' is not one of"),
    ({"objective": {"name": "dpo", "betta": 0.1}}, "is not valid under any of the given schemas"),
    ({"objective": {"name": "no_such_objective"}}, "is not valid under any of the given schemas"),
    ({"train": {"adam_betas": [0.9]}}, "is too short"),
    ({"objective": {"name": "dpo", "beta": 0}}, "is not valid under any of the given schemas"),
    # (each also refused by the loader; the schema let them through)
    ({"objective": [{"name": "dpo"}, {"name": "sft", "weight": 0}]}, "is not valid under any"),
    ({"model": {"train_layers": 0}}, "should not be valid under {'const': 0}"),
    ({"model": {"train_params": []}}, "should be non-empty"),
    ({"train": {"report_to": ["mlflow", "mlflow"]}}, "is not valid under any of the given"),
    ({"train": {"learning_rate": True}}, "True is not of type 'number'"),
])
def test_schema_rejects_a_bad_config(tree, problem):
    messages = [error.message for error in _validator("train").iter_errors(tree)]
    assert any(problem in message for message in messages), messages


def test_schema_accepts_the_objective_forms_the_config_accepts():
    validator = _validator("train")
    for tree in [{"objective": {"beta": 0.2}},  # name left out: dpo
                 {"objective": [{"name": "dpo"}, {"name": "sft", "weight": 0.2}]},
                 {"objective": {"name": "dpo", "beta": {"start": 0.05, "end": 0.5}}},
                 {"objective": {"name": "mypkg.losses:my_loss", "margin": 1.0}},
                 {"objective": "simpo"}, {"objective": ["dpo", {"name": "sft", "weight": 0.2}]},
                 {"objective": "mypkg.losses:my_loss"},
                 {"train": {"report_to": "tensorboard"}}, {"model": {"train_layers": -2}}]:
        assert list(validator.iter_errors(tree)) == [], tree
    assert list(validator.iter_errors({"objective": "simpoo"})) != []
    rm = _validator("rm")
    assert list(rm.iter_errors({"loss": {"name": "bt_margin", "margin_field": "gap"}})) == []
    assert list(rm.iter_errors({"loss": {"name": "bt", "margin_field": "gap"}})) != []
    for head, problem in (({"dims": 3}, "is not a multiple of 2"), ({"tau": 0}, "less than or "
                          "equal to the minimum of 0"), ({"quantiles": [0.5, 1.0]}, "greater than "
                          "or equal to the maximum of 1")):
        messages = [e.message for e in rm.iter_errors({"model": {"head": head}})]
        assert any(problem in m for m in messages), messages
    online = _validator("online")
    for settings, problem in (({"sampling": {"temperature": 0}}, "less than or equal to the "
                               "minimum of 0"), ({"eval_best_of": 1}, "should not be valid")):
        messages = [e.message for e in online.iter_errors({"online": settings})]
        assert any(problem in m for m in messages), messages


def test_schema_command_writes_the_schema(tmp_path, capsys):
    target = tmp_path / "online.schema.json"
    assert main(["config", "schema", "--kind", "online", "-o", str(target)]) == 0
    assert json.loads(target.read_text()) == json_schema("online")
    assert capsys.readouterr().out == f"wrote the online config schema to {target}\n"
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "preftune train config"
    assert main(["config", "schema", "-o", str(target)]) == 0  # an earlier schema: replaced
    assert json.loads(target.read_text()) == json_schema("train")
    mine = tmp_path / "my_run.yaml"  # a user's config: left as it is
    mine.write_text("train: {batch_size: 4}\n")
    for output, says in ((mine, "exists and is not a JSON schema"), (tmp_path, "is a folder")):
        assert main(["config", "schema", "-o", str(output)]) == 2
        assert f"-o {output} {says}" in capsys.readouterr().err
    assert mine.read_text() == "train: {batch_size: 4}\n"
    assert main(["config", "schema", "-o", str(tmp_path / "new" / "s.json")]) == 0  # made


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict:
    """Every leaf key of a config class with its field."""
    fields = {}
    for name, field in model.model_fields.items():
        options = getattr(field.annotation, "__args__", (field.annotation,))
        section = next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)
                        and o.model_config.get("extra") == "forbid"), None)
        fields.update(_leaf_fields(section, f"{prefix}{name}.") if section
                      else {prefix + name: field})
    return fields


@pytest.mark.parametrize("kind", KINDS)
def test_explain_lists_every_key_with_type_default_and_help(kind):
    blocks = explain(kind).replace("\n    ", " ").splitlines()  # one line per key
    listed = {line.split(": ", 1)[0]: line for line in blocks}
    fields = _leaf_fields(config_class(kind))
    assert sorted(listed) == sorted(fields)
    for key, field in fields.items():
        assert field.description, f"{key} has no help text"
        text = " ".join(field.description.split())
        assert text in listed[key], key
        if key not in ("objective", "loss"):  # these show the registry to look names up in
            assert listed[key].endswith(f" = {json.dumps(field.get_default())} {text}"), key


def test_explain_one_key_or_section(capsys):
    assert main(["config", "explain", "train.learning_rate"]) == 0
    assert capsys.readouterr().out == ("train.learning_rate: float >= 0 = 1e-06\n    Peak AdamW "
                                       "learning rate; 0 trains nothing (the policy_not_moving "
                                       "alarm says so).\n")
    assert main(["config", "explain", "--kind", "online", "online.sampling"]) == 0
    out = capsys.readouterr().out
    assert "online.sampling.top_p: float > 0, <= 1 = 1.0" in out
    assert "online.sampling.backend: hf | vllm = \"hf\"" in out and "online.rounds" not in out
    assert main(["config", "explain", "--kind", "rm", "loss"]) == 0
    assert "`preftune rm losses`" in capsys.readouterr().out


def test_explain_an_unknown_key_suggests_one(capsys):
    assert main(["config", "explain", "train.learning_rat"]) == 2
    assert "no key 'train.learning_rat' in a train config. Did you mean train.learning_rate?" \
        in capsys.readouterr().err
    assert main(["config", "explain", "objective.beta"]) == 2  # a parameter: by objective
    assert "no key 'objective.beta' in a train config. Its parameters depend on the " \
        "objective's name: `preftune objectives` lists each one's, with defaults." in \
        capsys.readouterr().err
    assert main(["config", "explain", "--kind", "diffusion", "objective"]) == 0
    assert "`preftune diffusion objectives`" in " ".join(capsys.readouterr().out.split())
