"""The code's layout keeps the promises of the README's "Code layout": layers that only point down (the list in the
README is the one checked), one name per role, each condition.txt key declared once (its Config field and its flag
derived from the key table)."""
import ast
import collections
import dataclasses
import re

import launch_ddp
from conftest import REPO
from modules.cli import build_parser
from modules.config import FLAG_KEYS, KEYS, Config
from modules.config.settings import Preset

MODULES = REPO / "modules"


def declared_layers() -> list:
    """The README's layers, top first: the names (a folder or a module of modules/) of the block in "Code layout"."""
    layout = (REPO / "README.md").read_text().split("## Code layout", 1)[1]
    block = re.search(r"```text\n(.*?)\n```", layout, flags=re.DOTALL).group(1)
    return [line.split()[0].removesuffix("/").removesuffix(".py") for line in block.splitlines() if line.strip()]


def imported_packages(path) -> set:
    """The top-level names under modules/ that a module imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modules"):
            parts = node.module.split(".")
            names.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("modules."))
    return names


def test_the_readme_declares_every_folder_and_top_level_module():
    present = {path.name.removesuffix(".py") for path in MODULES.iterdir()
               if (path.is_dir() and (path / "__init__.py").exists()) or (path.suffix == ".py"
                                                                        and path.name != "__init__.py")}
    assert sorted(declared_layers()) == sorted(present)


def test_no_module_imports_from_a_layer_above_its_own():
    layers = {name: rank for rank, name in enumerate(reversed(declared_layers()))}  # 0 at the bottom
    upward = []
    for path in sorted(MODULES.rglob("*.py")):
        own = path.relative_to(MODULES).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        upward += [f"{path.relative_to(REPO)} imports modules.{name} ({name} is above {own})"
                   for name in sorted(imported_packages(path)) if layers[name] > layers[own]]
    assert upward == []


def test_the_layering_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "example.py"
    module.write_text("def late():\n    from modules.training.loop import run_training\n")
    assert imported_packages(module) == {"training"}


def test_every_import_of_the_package_is_absolute():
    """The layering check reads absolute imports only, so a relative one (which would slip past it) is refused."""
    relative = [f"{path.relative_to(REPO)}:{node.lineno}" for path in sorted(MODULES.rglob("*.py"))
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


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
