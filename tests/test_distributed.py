"""Two processes (gloo on CPU, through accelerate) train exactly like one
process with the same global batch: each process takes its share of every step's examples and
of the reference pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_loop import (crashed_run, final_weights, losses, run,  # noqa: F401
                             workspace)
from forked_python import free_port, run_on_two_processes, run_python

from preftune.train.logging import read_metrics


def train_on_two_processes(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``preftune train config *args`` on two CPU processes (gloo)."""
    return run_on_two_processes(["-m", "preftune", "train", str(config), *args])


@pytest.mark.parametrize("layout,objective,strategy,adapter", [
    ("padded", "dpo", "precomputed", None), ("prefix_shared", "dpo", "precomputed", None),
    ("padded", "dpo", "live", None),
    ("prefix_shared", "tdpo", "live", None),  # token-level KL
    ("prefix_shared", "dpo", "adapter-off", "lora"),  # the reference = adapters switched off
    ("prefix_shared", "dpo", "precomputed", "qlora"),  # each holds the 4-bit base
    ("prefix_shared", "dpo", "precomputed", "pissa+"),  # PiSSA with LoRA+ rates
    ("prefix_shared", "dpo", "adapter-off", "head"),  # the tied head beside LoRA
    ("prefix_shared", "dpo", "precomputed", "top-layer"),  # model.train_layers
    ("padded", "dpo", "live", "sync"),  # TR-DPO: each moves its reference alike
    ("padded", "dpo", "live", "answers"),  # held-out answers: the main process writes them
    ("prefix_shared", "dpo", "precomputed", "checkpointed")])  # checkpointing
def test_two_processes_equal_one_with_the_same_global_batch(workspace, tmp_path, layout,  # noqa: F811
                                                            objective, strategy, adapter):
    name = f"{layout}-{objective}-{strategy}-{adapter}"
    lora = {"model__lora": {"r": 4, "alpha": 8}} \
        if adapter not in (None, "sync", "answers", "checkpointed") else {}
    if adapter == "qlora":
        lora["model__quantize"] = "nf4"
    if adapter == "pissa+":
        lora["model__lora"].update(init="pissa", lr_ratio=4.0)
    if adapter == "head":
        lora["model__lora"].update(modules_to_save=["lm_head"])
    if adapter == "top-layer":
        lora = {"model__train_layers": 1}
    if adapter == "sync":
        lora = {"reference__sync_every": 2, "reference__sync_mix": 0.5}
    if adapter == "answers":
        lora = {"train__eval_every": 3, "train__eval_generations": 2}
    if adapter == "checkpointed":
        lora = {"train__gradient_checkpointing": True}
    one = run(workspace, f"one-process-{name}", train__batch_size=8, train__max_steps=3,
              train__layout=layout, objective={"name": objective},
              reference__strategy=strategy, **lora)
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["output_dir"] = str(workspace / "runs" / f"two-processes-{name}")
    tree["train"]["batch_size"] = 4  # per process: 2 x 4 = the same 8 examples a step
    tree["reference"]["cache_dir"] = str(tmp_path / "cache")  # the reference pass runs again
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    done = train_on_two_processes(config)
    assert done.returncode == 0, done.stderr[-3000:]
    two = workspace / "runs" / f"two-processes-{name}"
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == [1, 2, 3]  # logged once
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    if strategy == "precomputed":  # the table the processes computed half each = the whole one
        # (the bar counts the main process's half: 18 of 36; it stopped at 50%)
        assert "reference logps (train, this process): 100%" in done.stderr
        (split_file,) = [
            p for p in (tmp_path / "cache").glob("reference-*.pt")
            if p.name in {q.name for q in (workspace / "cache").glob("reference-*.pt")}
            and torch.load(p)["logps"].shape[0] == 36]
        split, whole = torch.load(split_file), torch.load(workspace / "cache" / split_file.name)
        assert torch.equal(split["example_indices"], whole["example_indices"])
        # (other batch mates, other padding: equal up to float rounding)
        torch.testing.assert_close(split["logps"], whole["logps"], rtol=1e-6, atol=1e-5)
    ours, theirs = final_weights(two), final_weights(one)
    for name in theirs:  # (PiSSA's SVD rounds by the thread count: one process has two here)
        torch.testing.assert_close(ours[name], theirs[name], rtol=0,
                                   atol=1e-5 if adapter == "pissa+" else 1e-6, msg=name)
    if adapter == "answers":  # written once, the same answers as one process gives
        answers = [(two / "eval_generations.jsonl").read_text(),
                   (one / "eval_generations.jsonl").read_text()]
        assert answers[0] == answers[1] and answers[0].count("\n") == 2


def test_reference_table_parts_merge_in_example_order_with_their_token_logps():
    from types import SimpleNamespace

    from preftune.model.reference import _merged

    def part(indices):  # 2 responses per example; token log-probs tagged with their example
        return {"example_indices": torch.tensor(indices),
                "logps": torch.tensor([[-i, -i - 0.5] for i in indices], dtype=torch.float32),
                "token_counts": torch.tensor([[i + 1, i + 2] for i in indices]),
                "token_logps": [torch.full((i + 1 + slot,), float(i))
                                for i in indices for slot in (0, 1)]}

    examples = [SimpleNamespace(index=i) for i in (5, 2, 7, 0, 3)]
    merged = _merged([part([5, 7, 3]), part([2, 0])], examples)  # rank 0: 0::2, rank 1: 1::2
    assert merged["example_indices"].tolist() == [5, 2, 7, 0, 3]
    assert merged["logps"][:, 0].tolist() == [-5, -2, -7, 0, -3]
    assert merged["token_counts"][:, 1].tolist() == [7, 4, 9, 2, 5]
    assert [int(t[0]) for t in merged["token_logps"]] == [5, 5, 2, 2, 7, 7, 0, 0, 3, 3]
    assert [len(t) for t in merged["token_logps"]][:2] == [6, 7]


def test_a_one_process_run_resumes_on_two_with_the_same_global_batch(workspace, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    settings = dict(train__batch_size=8, train__max_steps=4, train__save_every=2)
    straight = run(workspace, "resume-straight", **settings)
    crashed_run(workspace, "resume-on-two", monkeypatch, 2, **settings)
    out = workspace / "runs" / "resume-on-two"
    tree = yaml.safe_load((out / "config.yaml").read_text())
    tree["train"]["batch_size"] = 4  # 2 processes x 4: the global batch of 8 is kept
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    done = train_on_two_processes(config, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)
    ours, theirs = final_weights(out), final_weights(straight)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    # another global batch is a change in training, refused with the keys
    tree["train"]["batch_size"] = 2
    config.write_text(yaml.safe_dump(tree))
    refused = run_python(["-m", "preftune", "train", str(config), "--resume"], timeout=300)
    assert refused.returncode == 2 and "the global batch would be 2 (batch_size 2 x " \
        "accumulation 1 x 1 process), and the run started with 8" in refused.stderr


def reward_model_on_two_processes_equals_one(tmp_path, launch_two, engine: str) -> None:
    """A tiny reward model trained by one process (batch 8) and by ``launch_two(config)``, a
    2-process ``preftune rm train`` (batch 4 each): same losses, and final weights that
    transformers loads, equal."""
    from test_reward_model import digit_pairs, write_jsonl
    from tiny_models import save_tiny_model_dir
    from transformers import AutoModelForSequenceClassification

    from preftune.reward.config import build_reward_config
    from preftune.reward.train import train_reward_model

    model_dir = save_tiny_model_dir(tmp_path / "decoder")
    data = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(64, 1))
    tree = {"output_dir": str(tmp_path / "one"), "model": {"path": str(model_dir)},
            "data": {"train": str(data)},
            "train": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 3,
                      "warmup_ratio": 0.0, "seed": 0}}
    one = train_reward_model(build_reward_config(tree), show_progress=False)
    tree["output_dir"], tree["train"]["batch_size"] = str(tmp_path / "two"), 4
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(tree))
    done = launch_two(config)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "run.json").read_text())["engine"] == engine
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    ours = AutoModelForSequenceClassification.from_pretrained(two / "model")
    theirs = AutoModelForSequenceClassification.from_pretrained(one / "model")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        # (gradients summed in another order: float rounding, ~1e-6 here)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_a_reward_model_trains_on_two_processes_like_on_one(tmp_path):
    reward_model_on_two_processes_equals_one(tmp_path, lambda config: run_on_two_processes(
        ["-m", "preftune", "rm", "train", str(config)]), engine="MULTI_CPU")


def test_two_machines_of_one_process_each_equal_one_process(workspace, tmp_path):  # noqa: F811
    """The multi-machine launch (one launcher per machine, here both on this one): node ranks
    find each other through the main address and train like one process."""
    one = run(workspace, "one-process-nodes", train__batch_size=8, train__max_steps=3)
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["output_dir"], tree["train"]["batch_size"] = str(workspace / "runs" / "two-nodes"), 4
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    port = free_port()  # for the rendezvous
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "preftune", "train", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:]
    two = workspace / "runs" / "two-nodes"
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    ours, theirs = final_weights(two), final_weights(one)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    said = [[line for line in out.splitlines() if not line.startswith("[Gloo]")]  # torch 2.9
            for out, _ in outputs]
    assert "done: model in" in outputs[0][0] and said[1] == []  # the first one speaks


def test_processes_that_cannot_see_each_other_are_stopped(workspace, tmp_path):  # noqa: F811
    one = run(workspace, "alone-base", train__max_steps=1)
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["output_dir"] = str(workspace / "runs" / "alone")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "preftune", "train", str(config)],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode != 0
    assert "2 processes were launched but each runs alone" in done.stderr
    assert "ACCELERATE_USE_CPU=true" in done.stderr
    assert not (workspace / "runs" / "alone").exists()


def as_two_processes_of_half_the_batch(one: Path, tmp_path: Path) -> tuple[Path, str]:
    """Run ``one``'s config again on two processes of half its batch: (the run, its output)."""
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["output_dir"] = str(tmp_path / "two")
    tree["train"]["batch_size"] //= 2
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    done = train_on_two_processes(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "two", done.stdout


def assert_trained_alike(two: Path, one: Path, workspace: Path) -> None:
    """The losses of ``one`` and each final weight within 5% of how far training moved it:
    Adam magnifies the rounding of a gradient entry near 0 (its step is about lr whatever
    its size)."""
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    ours, theirs = final_weights(two), final_weights(one)
    start = load_file(workspace / "model" / "model.safetensors")
    for weight in theirs:
        moved = (theirs[weight] - start[weight]).abs().max().item()
        assert (ours[weight] - theirs[weight]).abs().max().item() <= 0.05 * moved + 1e-6, weight


@pytest.mark.parametrize("name", ["bco", "group_robust_dpo"])
def test_an_objective_state_counts_every_process_like_one_process(workspace, tmp_path,  # noqa: F811
                                                                  name):
    """BCO's running mean and group-robust DPO's weights take in both processes' rewards and
    losses: the same state, losses and weights as one process with the global batch."""
    from test_objective_state import stateful_settings

    one = run(workspace, f"one-process-{name}", train__batch_size=8, train__max_steps=3,
              train__save_every=2, **stateful_settings(name, workspace))
    two, _ = as_two_processes_of_half_the_batch(one, tmp_path)
    states = [load_file(run_dir / "checkpoints" / "step-00000002" / "objective.safetensors")
              for run_dir in (two, one)]
    assert states[0].keys() == states[1].keys()
    for key in states[1]:  # (a mean of rewards that differ by rounding: 1.1e-5 on AVX-512)
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=0, msg=key)
    assert_trained_alike(two, one, workspace)


@pytest.mark.parametrize("objective, data", [
    ({"name": "kto", "beta": 1.0}, {"data__convert": "unpaired"}),
    ({"name": "bco_pair", "beta": 1.0, "reward_shift": True}, {}),
])
def test_a_statistic_of_the_step_is_taken_over_every_process(workspace, tmp_path,  # noqa: F811
                                                             objective, data):
    """KTO's z_ref and bco_pair's reward shift are means over both processes' examples (TRL
    gathers z_ref the same way): the losses and weights of one process with the global batch.
    Each process's mean alone gives other losses (checked: the run says nothing of a split)."""
    one = run(workspace, f"one-process-{objective['name']}", train__batch_size=8,
              train__max_steps=3, train__learning_rate=5e-2, objective=objective, **data)
    two, said = as_two_processes_of_half_the_batch(one, tmp_path)
    assert "reads each micro-batch as a whole" not in said
    assert_trained_alike(two, one, workspace)


def test_a_refusal_on_the_main_process_stops_every_process_alike(tmp_path):
    """A check only the main process runs (the output dir, --resume's settings, the held-out
    scorer): its error reaches the other processes, which raise it too, so none is left
    waiting at a collective (that was a page of rank 1's gloo traceback and exit 1)."""
    script = tmp_path / "refuse.py"
    script.write_text(
        "from accelerate import Accelerator\n"
        "from preftune.config import ConfigError\n"
        "from preftune.train.output import on_main_process\n"
        "accelerator = Accelerator(cpu=True)\n"
        "print('result', accelerator.process_index, on_main_process(accelerator, lambda: 5))\n"
        "def refuse():\n"
        "    raise ConfigError('refused here')\n"
        "try:\n"
        "    on_main_process(accelerator, refuse)\n"
        "except ConfigError as error:\n"
        "    print('rank', accelerator.process_index, 'raised', error)\n")
    done = run_on_two_processes([str(script)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["result 0 5", "rank 0 raised refused here",
                                        "result 1 None", "rank 1 raised refused here"]
