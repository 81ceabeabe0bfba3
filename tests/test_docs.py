"""The README and docs/: short README, the two commands first, every result file cited, no dead links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.startswith("bash scripts/demo.sh") and "bash scripts/test.sh" in first_block
    assert "(docs/results.png)" in text


def test_every_results_file_is_cited_by_the_docs():
    cited = " ".join(page.read_text() for page in PAGES)
    uncited = [p.name for p in sorted((ROOT / "results").iterdir()) if f"results/{p.name}" not in cited]
    assert uncited == []


def test_relative_links_point_at_files_that_exist():
    dead = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (page.parent / path).exists():
                dead.append(f"{page.name}: {target}")
    assert dead == []
