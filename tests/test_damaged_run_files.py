"""A file a run wrote itself, damaged since (a crash mid-write, a full disk, an edit), is named
with what to do when the run resumes, never a bare parser traceback."""

import pytest

from preftune.config import ConfigError, build_config
from preftune.data.records import DataError
from preftune.online.common import read_jsonl
from preftune.online.loop import run_phase
from preftune.train.output import check_resume


def test_a_damaged_round_file_is_named_with_what_to_do(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"prompt": "a", "samples": ["x"]}\n{"prompt": "b", "sam\n')
    with pytest.raises(DataError, match=rf"{samples}:2: not valid JSON .*Delete that round's "
                                        r"folder \(round-N, and any later one\) to redo it with "
                                        "--resume"):
        read_jsonl(samples)
    (tmp_path / "phases.json").write_text('{"sample": {"pro')
    with pytest.raises(DataError, match=f"{tmp_path / 'phases.json'}: not valid JSON"):
        run_phase(tmp_path, "sample", lambda: pytest.fail("a finished phase ran again"))


def test_a_damaged_config_yaml_of_a_run_is_named_on_resume(tmp_path):
    config = build_config({"output_dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"--resume in {tmp_path / 'run'}: .*config.yaml, the "
                                          "settings the run started with, is not valid YAML"):
        check_resume(config)
