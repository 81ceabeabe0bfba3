"""The README and docs/: short README, the two commands first, every result file cited by the docs and
listed in results/README.md (the index), no dead links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INDEX = ROOT / "results" / "README.md"


def results_files() -> list[str]:
    """Every file under results/ (studies' folders included) as the docs name it, the index left out."""
    files = [p for p in sorted((ROOT / "results").rglob("*")) if p.is_file() and p != INDEX]
    return [p.relative_to(ROOT).as_posix() for p in files]


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.startswith("bash scripts/demo.sh") and "bash scripts/test.sh" in first_block
    assert "(docs/results.png)" in text


def test_every_results_file_is_cited_by_the_docs():
    cited = " ".join(page.read_text() for page in PAGES)
    assert results_files() and [f for f in results_files() if f not in cited] == []


def test_the_index_has_a_row_for_every_results_file_and_names_every_benchmark_script():
    index = INDEX.read_text()
    rows = re.findall(r"^\| `(results/[^`]+)` \|", index, flags=re.M)
    assert sorted(rows) == sorted(results_files())  # no file missing, none twice, no row for a file that is gone
    scripts = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "benchmarks").rglob("*.py"))]
    assert [s for s in scripts if f"| `{s}` |" not in index] == []


def test_relative_links_point_at_files_that_exist():
    dead = []
    for page in [*PAGES, INDEX]:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (page.parent / path).exists():
                dead.append(f"{page.name}: {target}")
    assert dead == []
