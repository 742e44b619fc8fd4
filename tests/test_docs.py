"""The documentation stays true to the code: docs/cli.md is what scripts/cli_reference.py writes from the
`retro` command, and every relative link in README.md and docs/*.md reaches a file and a heading."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
GENERATOR = ROOT / "scripts" / "cli_reference.py"
MARKDOWN_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _load_generator():
    spec = importlib.util.spec_from_file_location("cli_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_reference = _load_generator()


# -- the generated command reference -------------------------------------------------------------------


def test_cli_reference_is_up_to_date():
    generated = cli_reference.render()
    committed = CLI_MD.read_text(encoding="utf-8")
    assert committed == generated, (
        "docs/cli.md differs from what scripts/cli_reference.py writes from the `retro` command: "
        "run `make cli-docs` and commit the result\n" + cli_reference.diff_head(committed, generated, "docs/cli.md"))


@pytest.mark.parametrize("terminal", [
    {"COLUMNS": "40", "NO_COLOR": "1", "TERM": "dumb"},
    {"COLUMNS": "200", "FORCE_COLOR": "1", "TERM": "xterm-256color"},
], ids=["narrow-no-colour", "wide-colour"])
def test_cli_reference_does_not_depend_on_the_terminal(terminal):
    code = ("import sys; sys.path.insert(0, 'scripts'); import cli_reference; "
            "sys.stdout.buffer.write(cli_reference.render().encode('utf-8'))")
    env = {**os.environ, **terminal}
    env.pop("NO_COLOR" if "FORCE_COLOR" in terminal else "FORCE_COLOR", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, check=True).stdout
    assert out.decode("utf-8") == cli_reference.render()


def test_cli_reference_shows_the_flag_forms_click_accepts():
    text = cli_reference.render()
    assert "| `--show-neighbors` | flag | off |" in text  # no `--no-show-neighbors` twin exists
    assert "--no-show-neighbors" not in text
    assert "| `--leakage` / `--no-leakage` | flag | `--leakage` |" in text


def test_check_names_the_stale_file_and_exits_1(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text(cli_reference.render().replace("## retro chunk", "## retro chonk"), encoding="utf-8")
    assert cli_reference.main(["--check"], output=stale) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"{stale} differs from what scripts/cli_reference.py writes: run `make cli-docs`"
    assert "-## retro chonk" in err and "+## retro chunk" in err
    stale.write_text(cli_reference.render(), encoding="utf-8")
    assert cli_reference.main(["--check"], output=stale) == 0


# -- relative links and their anchors ------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks: a link or heading in code is not one."""
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation other than '-' and
    '_' dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"\\(.)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        anchors.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_anchor(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")  # repeated headings get -1, -2, …
    return anchors


def relative_links(path: Path):
    """(line number, target) of every link in the file that is not a URL."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub("code", re.sub(r"\\.", "", line))  # escaped brackets open no link
        targets = [m.group(1) for m in _INLINE_LINK.finditer(line)]
        targets += [m.group(1) for m in _REFERENCE_DEFINITION.finditer(line)]
        for target in targets:
            target = target.strip("<>")
            if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http:, https:, mailto:
                yield number, target


def broken_links(path: Path) -> list[str]:
    problems, anchor_cache = [], {}
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and linked.suffix == ".md":
            if linked not in anchor_cache:
                anchor_cache[linked] = anchors_of(linked)
            if unquote(anchor).lower() not in anchor_cache[linked]:
                problems.append(f"{where}: no heading with anchor #{anchor} in {linked.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN_FILES])
def test_relative_links_reach_a_file_and_heading(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_github_anchor_rules(tmp_path):
    assert github_anchor("Scaling out with `--dask`") == "scaling-out-with---dask"
    assert github_anchor("Adding documents (`bench/bench_add.py`)") == "adding-documents-benchbench_addpy"
    assert github_anchor("bpb(α): r(C) ≤ α") == "bpbα-rc--α"
    assert github_anchor("[The guide](guide.md) and *more*") == "the-guide-and-more"
    doc = tmp_path / "doc.md"
    doc.write_text("# Notes\n\n## Notes\n\n```\n# not a heading\n```\n\n## Notes\n", encoding="utf-8")
    assert anchors_of(doc) == {"notes", "notes-1", "notes-2"}


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: p.name)
def test_python_examples_name_what_the_package_has(path):
    """Every name a Markdown Python example imports from retrocli exists (a moved function breaks the
    example before it breaks a user), and every example parses."""
    for block in _python_blocks(path):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrocli"):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{path.name}: {node.module} has no {', '.join(missing)}"
