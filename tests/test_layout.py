"""The package's layout is its table of contents: the paper's files at the top of nxtp_minimal/ import
nothing from the tool folders (weights/, training/, tools/), so a reader can hold the method on its own."""

import ast
from pathlib import Path

import nxtp_minimal

PACKAGE = Path(nxtp_minimal.__file__).parent
TOOLS = ("weights", "training", "tools")
PAPER = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def imported_modules(path: Path) -> set:
    """Every nxtp_minimal module a file imports, as dotted names under the package (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.removeprefix("nxtp_minimal.") for a in node.names if a.name.startswith("nxtp_minimal.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("nxtp_minimal"):
                base = node.module.removeprefix("nxtp_minimal").lstrip(".") if node.level == 0 else node.module
                names |= {f"{base}.{a.name}" if base else a.name for a in node.names}
            elif node.level > 1:  # a top-level file has no parent package inside nxtp_minimal
                names.add("<outside the package>")
    return names


def test_the_paper_files_are_the_top_level():
    assert {p.stem for p in PAPER} == {
        "config", "preprocess", "vit", "tokenizer", "prompt", "masks", "llama", "model", "sampling", "cache",
        "inference",
    }
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= set(TOOLS)


def test_paper_files_import_no_tool_folder():
    for path in PAPER:
        reaching = {name for name in imported_modules(path) if name.split(".")[0] in TOOLS}
        assert not reaching, f"{path.name} imports {sorted(reaching)}; the paper's files must not use {TOOLS}"


def test_the_rule_is_checked_on_a_planted_import(tmp_path):
    # the parser above sees the three ways a file could reach a tool folder
    planted = tmp_path / "planted.py"
    planted.write_text("from .tools.errors import UserError\nfrom . import training\nimport nxtp_minimal.weights.format\n")
    assert {n.split(".")[0] for n in imported_modules(planted)} == {"tools", "training", "weights"}


def test_public_names_keep_working():
    for name in ("load", "load_demo", "save", "NXTP", "preprocess", "load_image", "Tokenizer", "released"):
        assert hasattr(nxtp_minimal, name), name
