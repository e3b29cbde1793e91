"""``--resume`` compares an objective's parameters as they resolve: a default written out is
the same setting as one left out (it used to be refused as a change), and a real change is
still refused, for a policy's objective terms, a reward loss and a diffusion objective."""

import pytest
import yaml

from preftune.config import ConfigError, build_config
from preftune.diffusion.config import DiffusionConfig
from preftune.reward.config import RewardConfig
from preftune.train.output import check_resume


def _started(out, config) -> None:
    """``out`` as a run of ``config`` leaves it: its config.yaml."""
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump()))


def test_a_policy_objective_default_written_out_resumes(tmp_path):
    tree = {"output_dir": str(tmp_path / "run"), "data": {"train": "pairs.jsonl"},
            "objective": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}]}
    _started(tmp_path / "run", build_config(tree))
    explicit = {**tree, "objective": [{"name": "dpo", "beta": 0.1},
                                      {"name": "sft", "weight": 0.5}]}
    check_resume(build_config(explicit))
    changed = {**tree, "objective": [{"name": "dpo", "beta": 0.2},
                                     {"name": "sft", "weight": 0.5}]}
    with pytest.raises(ConfigError, match=r"objective: \[\{.*'beta': 0.1.*\] -> \[\{.*'beta': "
                                          r"0.2"):
        check_resume(build_config(changed))


def test_a_run_started_with_the_default_written_out_resumes_without_it(tmp_path):
    tree = {"output_dir": str(tmp_path / "run"), "data": {"train": "pairs.jsonl"},
            "objective": {"name": "ipo", "beta": 0.1}}
    _started(tmp_path / "run", build_config(tree))
    check_resume(build_config({**tree, "objective": "ipo"}))
    with pytest.raises(ConfigError, match=r"settings differ"):
        check_resume(build_config({**tree, "objective": "dpo"}))


def test_a_reward_loss_default_written_out_resumes(tmp_path):
    tree = {"output_dir": str(tmp_path / "rm"), "data": {"train": "pairs.jsonl"}}
    _started(tmp_path / "rm", build_config(tree, schema=RewardConfig))
    check_resume(build_config({**tree, "loss": {"name": "bt", "label_smoothing": 0.0}},
                              schema=RewardConfig))
    with pytest.raises(ConfigError, match=r"\(loss.label_smoothing: 0.0 -> 0.1\)"):
        check_resume(build_config({**tree, "loss": {"name": "bt", "label_smoothing": 0.1}},
                                  schema=RewardConfig))


def test_a_diffusion_objective_default_written_out_resumes(tmp_path):
    tree = {"output_dir": str(tmp_path / "diffusion"), "data": {"train": "pairs.jsonl"}}
    _started(tmp_path / "diffusion", build_config(tree, schema=DiffusionConfig))
    check_resume(build_config({**tree, "objective": {"name": "diffusion_dpo", "beta": 5000}},
                              schema=DiffusionConfig))
    with pytest.raises(ConfigError, match=r"\(objective.beta: 5000.0 -> 2500\)"):
        check_resume(build_config({**tree, "objective": {"name": "diffusion_dpo",
                                                         "beta": 2500}}, schema=DiffusionConfig))
