"""The report as one self-contained HTML page.

Everything is inline (CSS in a style element, figures as base64 PNG data URIs, system fonts
only) so the file can be mailed, attached to an issue or opened offline and still look the same.
All text from the run directory is escaped: messages and config values are data, not markup.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime
from html import escape

from .. import __version__
from ..data.records import plain_text
from ..train.model_card import reference_text
from .rundir import RunData

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; --warn: #b35900; }
* { box-sizing: border-box; }
body { margin: 0; padding: 28px 36px 48px; color: var(--ink); background: #fff;
  font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 18px; margin: 32px 0 12px; padding-bottom: 6px;
  border-bottom: 1px solid var(--line); }
.path { color: var(--muted); margin: 0 0 18px;
  font-family: ui-monospace, Menlo, Consolas, monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 0 0 8px; padding: 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 130px;
  background: var(--soft); }
.card dt { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.card dd { margin: 0; font-size: 15px; font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { text-align: left; padding: 5px 12px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.kind { color: var(--warn); font-weight: 600; white-space: nowrap; }
.note { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px;
  background: #fff; }
figure img { display: block; width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; padding: 4px 4px 0; }
details { margin-top: 28px; }
summary { cursor: pointer; font-weight: 600; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 12px;
  overflow-x: auto; font-size: 12px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def render_page(run: RunData, figures: list[tuple[str, str, bytes]],
                reward_figures: list[tuple[str, str, bytes]] = (),
                online_figures: list[tuple[str, str, bytes]] = ()) -> str:
    """The HTML page for ``run``; ``figures`` are (file name, title, PNG bytes) in order,
    ``reward_figures`` those of a reward model's rm_eval.json, ``online_figures`` those of an
    online run's rounds."""
    sections = [
        f"<h1>preftune report</h1>\n<p class=\"path\">{escape(str(run.run_dir))}</p>",
        _summary(run),
        _online(run.online, online_figures),
        _data_report(run.data_report),
        _alarms(run.alarms),
        _figures(figures),
        _samples(run),
        _answers(run.answers),
        _eval_table(run.eval_results),
        _reward_eval(run.reward_eval, reward_figures),
        _config(run.config_text),
        f"<footer>Written by preftune {__version__} on "
        f"{datetime.now().strftime('%Y-%m-%d %H:%M')}.</footer>",
    ]
    body = "\n".join(section for section in sections if section)
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>preftune report: {escape(run.run_dir.name)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _format_value(value) -> str:
    """A number short enough for a table cell; anything else as compact JSON."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


EVAL_SETTINGS = ("sampling_steps", "true_cfg_scale")  # diffusion eval.json: settings, not metrics


def _top_level_numbers(values: dict) -> dict[str, float]:
    """The top-level numeric entries of ``values``; nested settings, lists and text are left out."""
    return {key: value for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _summary(run: RunData) -> str:
    """Cards with what was trained how: objective, parameters, reference, layout, steps."""
    info = run.run_info or {}
    last = run.metrics[-1]
    cards = [
        ("objective", info.get("objective")),
        ("reward loss", info.get("reward_loss")),
        ("head", (info.get("head") or {}).get("kind")),
        ("parameters", _params(info.get("params")) if "objective" in info
         else _params({info["reward_loss"]: info.get("params")}) if "reward_loss" in info
         else None),
        ("reference", reference_text(info)),
        ("layout", info.get("layout")),
        ("steps logged", f"{len(run.metrics)} (last: {last['step']}"
                         + (f" of {info['steps']})" if "steps" in info else ")")),
        ("examples", _examples(info)),
        ("last loss", _format_value(last["loss"]) if "loss" in last else None),
        ("alarms", str(len(run.alarms))),
    ]
    items = "".join(f"<div class=\"card\"><dt>{escape(name)}</dt>"
                    f"<dd>{escape(str(value))}</dd></div>"
                    for name, value in cards if value is not None)
    note = ("" if run.run_info else "<p class=\"note\">run.json is missing: the run has not "
            "finished (or was stopped), so objective, reference and layout are not known yet"
            + ("; config.yaml below has the settings" if run.config_text else "") + ".</p>")
    return f"<dl class=\"cards\">{items}</dl>{note}"


def _params(params: dict | None) -> str | None:
    """``{"dpo": {"beta": 0.1}, "sft": {}}`` as ``dpo: beta=0.1; sft``: a clause per term."""
    if not params:
        return None
    return "; ".join(name + (": " + ", ".join(f"{key}={_format_value(value)}"
                                              for key, value in values.items()) if values else "")
                     for name, values in params.items())


def _examples(info: dict) -> str | None:
    if "train_examples" not in info:
        return None
    return f"{info['train_examples']} train / {info.get('eval_examples', 0)} eval"


def _data_report(report: dict | None) -> str:
    """Per split: records read, rows kept, and any problem counters that are not zero."""
    if not report:
        return ""
    rows, converted = [], report.get("convert")
    for split in ("train", "eval"):
        counts = report.get(split)
        if not isinstance(counts, dict):
            continue
        named = counts.get("origins", {})
        problems = ", ".join(
            f"{escape(key)} {escape(str(value))}"
            + (f" (e.g. {escape(', '.join(named[key]))})" if key in named else "")
            for key, value in counts.items() if key not in ("records", "kept", "origins")
            and value)
        if converted:
            split = f"{split} (data.convert {converted['conversions']} of the " \
                    f"{converted['read'][split]} read)"
        left_out = counts.get("records", 0) - counts.get("kept", 0)
        if not problems and isinstance(left_out, int) and left_out > 0:  # (no reason counted)
            problems = f"left out {left_out}"
        rows.append(f"<tr><td>{escape(split)}</td>"
                    f"<td class=\"num\">{counts.get('records', '')}</td>"
                    f"<td class=\"num\">{counts.get('kept', '')}</td>"
                    f"<td>{problems or '<span class=note>none</span>'}</td></tr>")
    shape = f": {escape(str(report['shape']))}" if "shape" in report else ""
    skipped = report.get("skipped_rows")
    malformed = (f"\n<p>Malformed records left out (data.on_error: skip): {skipped['count']}, "
                 f"the first: {escape(str(skipped['reasons'][0]))}</p>"
                 if isinstance(skipped, dict) and skipped.get("reasons") else "")
    return (f"<h2>Data{shape}</h2>\n<table><tr><th>split</th><th>records</th><th>kept</th>"
            f"<th>dropped, truncated or suspicious</th></tr>{''.join(rows)}</table>{malformed}")


def _alarms(alarms: list[dict]) -> str:
    """The alarms table, or a line saying none fired."""
    if not alarms:
        return "<h2>Alarms</h2>\n<p class=\"note\">No alarms fired.</p>"
    rounds = any("round" in alarm for alarm in alarms)  # an online run's: steps of all rounds
    rows = "".join(f"<tr><td class=\"num\">{escape(str(alarm.get('step', '')))}</td>"
                   + (f"<td class=\"num\">{escape(str(alarm.get('round', '')))}</td>"
                      if rounds else "")
                   + f"<td class=\"kind\">{escape(str(alarm.get('kind', '')))}</td>"
                   f"<td>{escape(str(alarm.get('message', '')))}</td></tr>" for alarm in alarms)
    round_head = "<th>round</th>" if rounds else ""
    return (f"<h2>Alarms ({len(alarms)})</h2>\n<p class=\"note\">Also marked as dotted lines "
            f"on the loss plot.</p>\n<table><tr><th>step</th>{round_head}<th>kind</th>"
            f"<th>message</th></tr>{rows}</table>")


def _figure_grid(figures) -> str:
    """Embedded images, each captioned with its PNG file name under report/."""
    items = []
    for file_name, title, png in figures:
        data = base64.b64encode(png).decode("ascii")
        items.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{escape(title)}\">"
                     f"<figcaption>{escape(title)} &middot; report/{escape(file_name)}"
                     f"</figcaption></figure>")
    return f"<div class=\"grid\">{''.join(items)}</div>"


def _figures(figures: list[tuple[str, str, bytes]]) -> str:
    """The training panels."""
    return (f"<h2>Training curves</h2>\n<p class=\"note\">Lines are training steps; diamonds "
            f"are evaluation on held-out data at the same step.</p>\n{_figure_grid(figures)}")


def _samples(run: RunData) -> str:
    """Image grids sampled from fixed prompts and seeds before and after training (diffusion
    runs: samples/samples.json names them), side by side."""
    index = run.samples
    if not index or not index.get("grids"):
        return ""
    grids = []
    for label, file_name in index["grids"].items():
        path = run.run_dir / "samples" / file_name
        if path.is_file():
            grids.append((f"../samples/{file_name}", f"{label} training", path.read_bytes()))
    prompts = "".join(f"<li>{escape(str(p))}</li>" for p in index.get("prompts", []))
    return (f"<h2>Samples before and after training</h2>\n<p class=\"note\">A row per prompt, "
            f"a column per seed ({escape(', '.join(map(str, index.get('seeds', []))))}); the "
            f"same seed starts from the same noise; {index.get('steps')} DDIM steps, guidance "
            f"{index.get('guidance_scale')}.</p>\n<ol>{prompts}</ol>\n{_figure_grid(grids)}")


def _answers(rows: list[dict], shown: int = 8) -> str:
    """Greedy answers to held-out prompts (train.eval_generations) at the first and the last
    evaluation, side by side, with their scores when a scorer was set."""
    if not rows:
        return ""
    steps = sorted({row["step"] for row in rows})
    first, last = steps[0], steps[-1]
    at = {(row["step"], row["origin"]): row for row in rows}
    origins = list(dict.fromkeys(row["origin"] for row in rows if row["step"] == last))[:shown]

    def cell(row: dict | None) -> str:
        if row is None:
            return "<td></td>"
        score = f" <em>(score {_format_value(row['score'])})</em>" if "score" in row else ""
        return f"<td>{escape(row['answer'])}{score}</td>"

    body = "".join(f"<tr><td>{escape(plain_text(at[(last, origin)]['prompt']))}</td>"
                   f"{cell(at.get((first, origin)))}{cell(at[(last, origin)])}</tr>"
                   for origin in origins)
    return (f"<h2>Answers to held-out prompts</h2>\n<p class=\"note\">Greedy answers at the "
            f"first and the last evaluation (step {first} and {last}); every evaluation's are in "
            f"eval_generations.jsonl.</p>\n<table><tr><th>prompt</th><th>step {first}</th>"
            f"<th>step {last}</th></tr>{body}</table>")


def _reward_eval(results: dict | None, figures) -> str:
    """rm_eval.json's headline numbers and figures, when the run has been through rm eval."""
    if results is None:
        return ""
    numbers = {key: value for key, value in _top_level_numbers(results).items()
               if not key.startswith("accuracy/")}
    rows = "".join(f"<tr><td>{escape(key)}</td><td class=\"num\">{_format_value(value)}</td></tr>"
                   for key, value in numbers.items())
    source = escape(str(results.get("data", "")))
    return (f"<h2>Reward model evaluation (rm_eval.json)</h2>\n<p class=\"note\">On {source}: "
            f"pairwise accuracy, calibration of P(chosen &gt; rejected), rewards.</p>\n"
            f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>\n"
            f"{_figure_grid(figures)}")


def _online(summary: dict | None, figures) -> str:
    """The rounds of an online run: a table of what each round did and the per-round figures."""
    if summary is None:
        return ""
    from .online import round_rows

    rows = round_rows(summary)
    if not rows:
        return ""
    head = "".join(f"<th>{escape(name)}</th>" for name in rows[0])
    body = "".join("<tr>" + "".join(
        f"<td class=\"num\">{'' if value is None else _format_value(value)}</td>"
        for value in row.values()) + "</tr>" for row in rows)
    initial = summary.get("initial") or {}
    before = (f"<p class=\"note\">Held-out score before the first round: "
              f"{_format_value(initial['mean_score'])}.</p>" if "mean_score" in initial else "")
    return (f"<h2>Online rounds (online.json)</h2>\n{before}<table><tr>{head}</tr>{body}</table>\n"
            f"{_figure_grid(figures)}<p class=\"note\">The training curves below join the rounds "
            "(steps counted across rounds).</p>")


def _eval_table(results: dict | None) -> str:
    """eval.json's top-level numbers (written by ``preftune eval`` or ``diffusion eval``),
    when the file exists, under what they were measured against."""
    if results is None:
        return ""
    numbers = {key: value for key, value in _top_level_numbers(results).items()
               if key not in EVAL_SETTINGS}
    if not numbers:
        return "<h2>Evaluation (eval.json)</h2>\n<p class=\"note\">eval.json has no numbers.</p>"
    rows = "".join(f"<tr><td>{escape(key)}</td><td class=\"num\">{_format_value(value)}</td></tr>"
                   for key, value in numbers.items())
    return (f"<h2>Evaluation (eval.json)</h2>\n{_eval_about(results)}<table><tr><th>metric</th>"
            f"<th>value</th></tr>{rows}</table>")


def _eval_about(results: dict) -> str:
    """The reference and the scorer an eval.json measured against, and a diffusion
    evaluation's prompts x seeds (its settings sit beside its numbers)."""
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    parts = []
    for label, key in (("against", "reference"), ("judged by", "scorer")):
        value = results.get(key) or settings.get(key)
        if isinstance(value, str):
            parts.append(f"{label} {value}")
    prompts, seeds = results.get("prompts"), results.get("seeds")
    if isinstance(prompts, list) and isinstance(seeds, list):
        parts.append(f"on {len(prompts)} prompts x {len(seeds)} seeds, "
                     f"{results.get('sampling_steps')} sampling steps")
    return f"<p class=\"note\">{escape('; '.join(parts))}.</p>" if parts else ""


def _config(config_text: str | None) -> str:
    if config_text is None:
        return ""
    return f"<details><summary>config.yaml</summary><pre>{escape(config_text)}</pre></details>"
