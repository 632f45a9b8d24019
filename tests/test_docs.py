"""The docs stay true: a short README, links that resolve, no machine paths, every environment variable the package
reads listed in docs/environment.md, and the commands marked `<!-- cheap-command -->` run as written."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_MAX_LINES = 150
CHEAP_MARK = "<!-- cheap-command -->"
CHEAP_TIMEOUT_S = 120


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------------ README, links
def test_readme_is_a_front_door():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"


_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links in `text` that point into the repository (code spans and blocks ignored)."""
    text = _CODE.sub("", _FENCE.sub("", text))
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):  # https:, mailto:, an anchor here
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_link_scanner_sees_links_and_skips_code():
    text = "see [a](docs/a.md#x), ![i](img.png) and [w](https://x.org)\n`[no](code.md)`\n```\n[no](block.md)\n```\n"
    assert relative_links(text) == ["docs/a.md", "img.png"]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_existing_files(page):
    assert DOCS, "docs/*.md not found"
    missing = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not missing, f"{_rel(page)}: links to files that do not exist: {missing}"


# ------------------------------------------------------------------------------------------------ machine paths
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|Users)/")


def _markdown_files() -> list[Path]:
    """Every .md file git tracks or would track (untracked, not ignored); without git, every .md outside hidden
    and virtualenv directories."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
        files = [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*.md")
                 if not any(part.startswith(".") or part in ("node_modules", "build") for part in
                            p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file()]


def test_machine_path_pattern():
    assert MACHINE_PATH.search("git clone /work/main x") and MACHINE_PATH.search("(/root/.cache)")
    assert not MACHINE_PATH.search("https://host/work/x, ~/.cache/mmcoconut, /tmp/ci5, /shared/hf, a/home/b")


def test_no_markdown_file_holds_a_machine_path():
    files = _markdown_files()
    assert ROOT / "README.md" in files
    bad = [f"{_rel(f)}:{i}: {line.strip()[:100]}" for f in files
           for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if MACHINE_PATH.search(line)]
    assert not bad, "absolute paths of a machine (use paths relative to the repo root):\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------------ environment
ENV_NAME = re.compile(r"MMCOCONUT_[A-Z0-9_]+")
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def _is_environ(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def env_reads(source: str) -> set[str]:
    """Environment variables a module reads: os.environ.get("X"), os.getenv("X"), os.environ["X"] (not as an
    assignment target), "X" in os.environ, a module-level constant naming X in those places, and every
    MMCOCONUT_* name inside a string literal (names only written, e.g. setdefault / update / os.environ[X] = ...,
    do not count; neither does a Python identifier such as MMCOCONUT_KEY)."""
    tree = ast.parse(source)
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
              for t in n.targets if isinstance(t, ast.Name)}

    def name_of(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return consts.get(node.id)
        return None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(ENV_NAME.findall(node.value))
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "get" and _is_environ(f.value)) or \
                    (isinstance(f, ast.Attribute) and f.attr == "getenv") or (isinstance(f, ast.Name) and f.id == "getenv"):
                found.add(name_of(node.args[0]))
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            found.add(name_of(node.slice))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
                and _is_environ(node.comparators[0]):
            found.add(name_of(node.left))
    return {n for n in found if n}


def package_env_reads() -> dict[str, list[str]]:
    """{variable: [files reading it]} over mmcoconut/**/*.py."""
    out: dict[str, list[str]] = {}
    for f in sorted((ROOT / "mmcoconut").rglob("*.py")):
        for name in env_reads(f.read_text(encoding="utf-8")):
            out.setdefault(name, []).append(_rel(f))
    return out


def test_env_scanner():
    src = '''import os
KEY = "MMCOCONUT_ABC"
MMCOCONUT_KEY = "x"
a = os.environ.get("A1", "0"); b = os.getenv("B1"); c = os.environ["C1"]; d = "D1" in os.environ
e = os.environ.get(KEY); ds = {}; ds[MMCOCONUT_KEY] = 1
os.environ["W1"] = "1"; os.environ.setdefault("W2", "1"); os.environ.update(W3="1")
"""Debug knob: MMCOCONUT_STOP_AFTER_STEPS=N"""
'''
    assert env_reads(src) == {"A1", "B1", "C1", "D1", "MMCOCONUT_ABC", "MMCOCONUT_STOP_AFTER_STEPS"}


def _word(name: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def test_environment_md_lists_every_variable_the_package_reads():
    reads = package_env_reads()
    assert {"MMCOCONUT_INJECT", "MMCOCONUT_DEBUG", "RANK", "WANDB_MODE"} <= set(reads), sorted(reads)  # the scan works
    assert "MMCOCONUT_KEY" not in reads  # a Python identifier, not an environment variable
    text = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
    missing = {n: files for n, files in reads.items() if not _word(n, text)}
    assert not missing, f"docs/environment.md does not list these environment variables (read in): {missing}"


def test_launcher_variables_are_in_a_set_by_launchers_part():
    text = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
    m = re.search(r"^#+ [^\n]*set by launchers[^\n]*\n(.*?)(?=^#+ |\Z)", text, re.S | re.M | re.I)
    assert m, "docs/environment.md has no 'Set by launchers' heading"
    launcher_reads = (set(package_env_reads()) & LAUNCHER_VARS) | {"MASTER_ADDR", "MASTER_PORT"}
    missing = sorted(n for n in launcher_reads if not _word(n, m.group(1)))
    assert not missing, f"not in the 'Set by launchers' part of docs/environment.md: {missing}"


# ------------------------------------------------------------------------------------------------ cheap commands
def cheap_commands(text: str) -> list[str]:
    """The commands of every ```bash block preceded by a `<!-- cheap-command -->` line: one per line (comments and
    blank lines dropped, `\\` continuations joined). ValueError for a marker not followed by such a block."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != CHEAP_MARK:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() not in ("```bash", "```sh", "```shell"):
            raise ValueError(f"line {i + 1}: {CHEAP_MARK} is not followed by a ```bash block")
        cmd = ""
        for body in lines[j + 1:]:
            if body.strip().startswith("```"):
                break
            if not body.strip() or body.lstrip().startswith("#"):
                continue
            cmd += body.strip() if cmd else body.rstrip()
            if cmd.endswith("\\"):
                cmd = cmd[:-1].rstrip() + " "
                continue
            out.append(cmd.strip())
            cmd = ""
        else:
            raise ValueError(f"line {j + 1}: the cheap-command block is not closed")
    return out


def _all_cheap() -> list[tuple[str, str]]:
    return [(_rel(p), c) for p in PAGES for c in cheap_commands(p.read_text(encoding="utf-8"))]


def test_cheap_command_parser():
    text = f"{CHEAP_MARK}\n```bash\n# a comment\nfoo --help\nbar \\\n  --x\n```\n```bash\nnot marked\n```\n"
    assert cheap_commands(text) == ["foo --help", "bar --x"]
    with pytest.raises(ValueError):
        cheap_commands(f"{CHEAP_MARK}\ntext\n")


def test_docs_mark_cheap_commands():
    cmds = _all_cheap()
    pages = {p for p, _ in cmds}
    assert len(cmds) >= 5 and len(pages) >= 3, cmds
    assert any("mmcoconut.train --help" in c for _, c in cmds), "the trainer's --help should be a checked command"


@pytest.mark.parametrize("page, command", _all_cheap())
def test_cheap_command_runs_as_written(page, command):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("WANDB_MODE", "disabled")
    try:
        r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=CHEAP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{page}: `{command}` took more than {CHEAP_TIMEOUT_S} s: not a cheap command")
    assert r.returncode == 0, f"{page}: `{command}` exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


# ------------------------------------------------------------------------------------------------ generated blocks
def test_config_help_write_renews_the_blocks_a_file_holds(tmp_path, monkeypatch, capsys):
    from mmcoconut.config_help import begin_marker, main, markdown_table, seed_table

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("# T\n<!-- seed-keys:begin (generated: old) -->\nstale\n<!-- seed-keys:end -->\nend\n")
    assert main(["--write", "docs/page.md"]) == 0
    assert page.read_text() == ("# T\n" + begin_marker("seed-keys", "docs/page.md") + seed_table()
                                + "<!-- seed-keys:end -->\nend\n")
    assert "(generated: python -m mmcoconut.config_help --write docs/page.md)" in page.read_text()
    assert markdown_table() not in page.read_text()  # only the blocks the file holds

    plain = tmp_path / "plain.md"
    plain.write_text("no generated block here\n")
    assert main(["--write", "plain.md"]) == 2
    assert plain.read_text() == "no generated block here\n"
    assert "no generated block" in capsys.readouterr().err

    torn = tmp_path / "torn.md"
    torn.write_text(begin_marker("config-reference", "torn.md") + "no end\n")
    assert main(["--write", "torn.md"]) == 2 and torn.read_text().endswith("no end\n")


def test_readme_holds_no_generated_block():
    from mmcoconut.config_help import blocks_in
    assert blocks_in((ROOT / "README.md").read_text(encoding="utf-8")) == []
