"""The code's layout keeps the promises of the README's "Code layout": folders by job and small enough to read, one
name per role, each condition.txt key declared once (its Config field and its flag derived from the key table)."""
import ast
import collections
import dataclasses

import launch_ddp
from conftest import REPO
from modules.cli import build_parser
from modules.config import FLAG_KEYS, KEYS, Config
from modules.config.settings import Preset

MODULES = REPO / "modules"
MOST_MODULES_PER_FOLDER = 10


def test_modules_are_in_folders_by_job_none_holding_more_than_ten():
    folders = collections.Counter(path.parent.name for path in MODULES.rglob("*.py") if path.name != "__init__.py")
    assert set(folders) == {"modules", "config", "data", "models", "training", "evaluation", "uncertainty", "storage",
                            "commands"}
    assert folders["modules"] == 2  # cli.py, errors.py: the rest lives in a folder that names its job
    assert max(folders.values()) <= MOST_MODULES_PER_FOLDER


def test_no_name_is_defined_in_two_modules():
    """A function or class name means one thing: no two modules define the same top-level name."""
    where = collections.defaultdict(list)
    for path in MODULES.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                where[node.name].append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_config_has_one_field_per_key_and_preset_line_and_nothing_else():
    fields = [field.name for field in dataclasses.fields(Config)]
    assert fields == ["preset_index", *(field.name for field in dataclasses.fields(Preset)),
                      *(key.field for key in KEYS)]
    assert len(set(fields)) == len(fields)


def test_flags_that_are_keys_come_from_the_key_table_in_both_commands():
    def flags(parser):
        return {option[2:] for action in parser._actions for option in action.option_strings}
    keyed = {key.field for key in FLAG_KEYS}
    assert keyed <= flags(build_parser())
    assert {key.field for key in FLAG_KEYS if key.launched} <= flags(launch_ddp.build_parser())
    assert "device" in keyed and "device" not in flags(launch_ddp.build_parser())  # each process picks its own GPU
    assert set(launch_ddp.CONFIG_FLAGS) == {key.field for key in FLAG_KEYS if key.launched}
