"""Installs: every console script runs (--help, exit 0) in the editable install that `make` creates and in the wheel
(tools/check_scripts.py, what .ci/run runs for both: an editable install once broke mmcoconut-shard while CI only
checked the wheel); the venv is exactly what the lock file constraints.txt pins (tools/lock_constraints.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_scripts  # noqa: E402
import lock_constraints  # noqa: E402


def test_every_pyproject_script_is_checked_and_a_broken_one_is_reported(tmp_path, monkeypatch):
    assert check_scripts.console_scripts() == sorted(
        ["mmcoconut-train", "mmcoconut-eval", "mmcoconut-shard", "mmcoconut-export", "mmcoconut-ask",
         "mmcoconut-predict"])
    for name in check_scripts.console_scripts():  # a fake install: one script whose module is gone
        body = ("import mmcoconut.tools.make_shards" if name == "mmcoconut-shard" else "print('usage: x')")
        (tmp_path / name).write_text(f"#!{sys.executable}\n{body}\n")
        (tmp_path / name).chmod(0o755)
    problems = check_scripts.run_all(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("mmcoconut-shard --help: exit 1: ModuleNotFoundError")
    assert "No module named 'mmcoconut.tools'" in problems[0]
    monkeypatch.chdir(tmp_path.parent)  # a relative bin dir, as .ci/run passes .venv/bin
    assert check_scripts.run_all(Path(tmp_path.name)) == problems


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["editable", "wheel"])
def test_console_scripts_run_in_a_fresh_install(tmp_path, kind):
    """A scratch venv (mmcoconut alone, dependencies seen through a .pth line), then every script --help."""
    args = ["--venv", str(tmp_path / "venv")]
    if kind == "wheel":
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "whl"), str(ROOT)], check=True)
        args += ["--wheel", str(next((tmp_path / "whl").glob("mmcoconut-*.whl")))]
    else:
        args += ["--editable"]
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "check_scripts.py"), *args], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0 and "all 6 console scripts run --help" in p.stdout, p.stdout + p.stderr
    py = str(tmp_path / "venv" / "bin" / "python")
    where = subprocess.run([py, "-c", "import mmcoconut; print(mmcoconut.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert (str(ROOT) in where) == (kind == "editable"), where


def test_the_venv_is_what_constraints_txt_pins_and_make_uses_it():
    """CI installs with -c constraints.txt (Makefile), so its venv is exactly the lock file; a dependency added to
    pyproject.toml, or a package upgraded in the venv, without `make lock` shows up here."""
    assert lock_constraints.differences(ROOT / "constraints.txt") == []
    pins = lock_constraints.read(ROOT / "constraints.txt")
    assert "torch" not in pins and {"transformers", "deepspeed", "webdataset", "pytest"} <= set(pins)
    make = (ROOT / "Makefile").read_text()
    assert make.count("pip install -q -c $(CONSTRAINTS)") == 2 and "CONSTRAINTS ?= constraints.txt" in make
    assert "tools/lock_constraints.py $(CONSTRAINTS)" in make  # make lock
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "check_scripts.py .venv/bin" in ci and "check_scripts.py --wheel" in ci
