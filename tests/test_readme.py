"""The README documents what the program does: every key, every flag, and the exact test command CI runs."""
import re

from conftest import REPO
from modules.cli import build_parser
from modules.config import KEYS

README = (REPO / "README.md").read_text()


def test_every_condition_key_has_a_row_in_the_readme():
    rows = set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", README, flags=re.MULTILINE))
    assert {key.name for key in KEYS} <= rows


def test_every_command_line_flag_is_in_the_readme():
    flags = {option for action in build_parser()._actions for option in action.option_strings if option.startswith("--")}
    flags.discard("--help")
    missing = [flag for flag in flags if f"`{flag}" not in README]
    assert missing == []


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.DOTALL)
    test_command = next(block for block in blocks if "pytest" in block)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]
