"""bench/gpu_check.sh rehearsed on CPU (--dry-run: GPU steps stubbed), so a syntax or path error cannot burn the
15 minutes a lent GPU gives: both calls run every step, write at most 8 files with the summary first, and report."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"1": ["01_env", "02_build", "03_kernel_tests", "04_eager_bench"],
         "2": ["01_env", "05_compiled_stage3", "06_compiled_stage0"]}


def _run(out, *args, **env):
    e = {k: v for k, v in os.environ.items() if k != "OUT"}
    e.update(OUT=str(out), OMP_NUM_THREADS="1", PYTHON=sys.executable)  # this venv's interpreter
    e.update(env)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=900)


def test_dry_run_of_both_calls(tmp_path):
    p = _run(tmp_path, "--dry-run")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for call, steps in STEPS.items():
        files = sorted(f.name for f in (tmp_path / call).iterdir())
        assert len(files) <= 8 and files[0] == "00_summary.txt", files  # what comes back from a device call
        assert files == ["00_summary.txt"] + [s + ".log" for s in steps], files
        summary = (tmp_path / call / "00_summary.txt").read_text()
        assert summary.startswith(f"gpu_check call {call} (dry run") and "TORCH_CUDA_ARCH_LIST=9.0" in summary
        for s in steps:
            assert f"[{s}] OK" in summary, summary
        assert f"gpu_check call {call}: all steps passed" in summary
    one = (tmp_path / "1" / "00_summary.txt").read_text()
    assert "registers mmcoconut_inject_cuda" in one and "tests collected" in one
    assert '"host_reads": 0' in one  # the sync check ran and found no host read
    assert "| 0 | bf16 | eager |" in one and "| 3 | bf16 | eager |" in one
    two = (tmp_path / "2" / "00_summary.txt").read_text()
    for stage in (3, 0):
        assert f"compare stage {stage} bf16" in two and f"| {stage} | bf16 | compiled |" in two
    assert "loss_rel_diff" in two and "error" not in two


def test_a_failing_step_is_reported_and_the_next_runs(tmp_path):
    p = _run(tmp_path, "2", "--dry-run", PYTHON="false")
    assert p.returncode == 1
    summary = (tmp_path / "00_summary.txt").read_text()
    for s in STEPS["2"]:
        assert f"[{s}] FAILED rc=1" in summary, summary
    assert "FAILED steps: 01_env 05_compiled_stage3 06_compiled_stage0" in summary
    assert _run(tmp_path, "3").returncode == 2
