"""The README's links lead somewhere: each #anchor to a heading, each relative path to a file."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_slug_follows_github():
    assert slug("Against TRL, measured") == "against-trl-measured"
    assert slug("Measured: Diffusion-DPO, SPO and RankDPO") == \
        "measured-diffusion-dpo-spo-and-rankdpo"


def test_every_readme_link_resolves():
    text = (REPO / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are not links
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert len(targets) > 20
    broken = [t for t in targets if not t.startswith(("http://", "https://")) and (
        t[1:] not in anchors if t.startswith("#") else
        not (REPO / t.split("#")[0]).exists())]
    assert broken == []
