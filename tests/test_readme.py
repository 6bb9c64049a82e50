"""The README and docs/ document what the program does: every flag, every key (docs/configuration.md is generated
from the key table and must not drift from it), every page the README links to, and the exact test command CI runs."""
import re

from conftest import REPO
from modules.cli import build_parser
from modules.config import KEYS
from modules.config.reference import reference_markdown

README = (REPO / "README.md").read_text()
CONFIGURATION = REPO / "docs" / "configuration.md"


def test_every_command_line_flag_is_in_the_readme():
    flags = {option for action in build_parser()._actions for option in action.option_strings
             if option.startswith("--")}
    flags.discard("--help")
    missing = [flag for flag in flags if f"`{flag}" not in README]
    assert missing == []


def test_the_configuration_page_is_the_one_the_key_table_generates():
    assert CONFIGURATION.read_text() == reference_markdown(), (
        "docs/configuration.md drifted from modules/config/keys.py: run "
        "python -m modules.config.reference > docs/configuration.md")
    rows = set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", CONFIGURATION.read_text(), flags=re.MULTILINE))
    assert rows == {key.name for key in KEYS}


def test_every_page_the_readme_links_to_exists_and_every_docs_page_is_linked():
    linked = {link.split("#")[0] for link in re.findall(r"\]\((docs/[^)]+)\)", README)}
    assert linked and all((REPO / link).is_file() for link in linked)
    assert {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")} <= linked


def heading_anchors(page) -> set:
    """The anchors GitHub gives a markdown page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_every_link_between_the_readme_and_the_docs_reaches_its_page_and_heading():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            target, _, anchor = link.partition("#")
            target = (page.parent / target).resolve() if target else page
            if not target.is_file() or (anchor and target.suffix == ".md" and anchor not in heading_anchors(target)):
                broken.append(f"{page.relative_to(REPO)}: {link}")
    assert broken == []


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.DOTALL)
    test_command = next(block for block in blocks if "pytest" in block)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]
