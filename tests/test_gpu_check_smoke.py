"""bench/gpu_check.py --smoke: the GPU check script's code path on the CPU at tiny sizes, so it cannot rot before
the next borrowed GPU run."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_and_writes_csv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--lengths", "256",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "# no failures" in done.stdout and "speedup_vs_dense" in done.stdout
    (path,) = tmp_path.glob("cpu-smoke-*.csv")
    rows = list(csv.DictReader(path.open()))
    assert all(r["device"] == "cpu-smoke" and r["torch"] for r in rows)
    correctness = [r for r in rows if r["stage"] == "correctness"]
    assert {r["dtype"] for r in correctness} == {"float32", "float16"}
    assert correctness and all(r["ok"] == "PASS" for r in correctness)
    perf = {(r["pattern"], r["impl"], r["backend"]): r for r in rows if r["stage"] == "perf"}
    for key in (("", "dense sdpa", "flash"), ("vs_1000_6096", "attention", "torch"),
                ("default", "estimate+attention", "torch"), ("default", "estimate", "")):
        assert float(perf[key]["ms"]) > 0, key
    assert 0 < float(perf[("default", "attention", "torch")]["density"]) <= 1
    assert float(perf[("default", "prefill (dense_below=0)", "auto")]["ms"]) > 0
    assert float(perf[("default", "prefill (dense_below=4096)", "auto")]["ms"]) > 0
    for name in ("vs_1000_6096", "default"):               # estimate by score backend (triton: GPU or interpreter)
        assert float(perf[(name, "estimate (torch scores)", "torch")]["ms"]) > 0
        assert perf[(name, "estimate (triton scores)", "")]["ok"] == "skipped"
