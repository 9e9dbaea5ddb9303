"""`python -m sparse_attn bench --audit`: the per-head table, the promise line per pattern, and the layout plot."""
import pytest

from sparse_attn.tools import bench


def test_audit_prints_every_head_and_saves_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "layouts.png"
    bench.main(["--audit", "--lengths", "1024", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
                "--patterns", "default", "vs", "--workload", "hard", "--plot", str(plot)])
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 4                                        # one per query head
    assert all(len(r.split()) == 2 + 2 * 2 + 1 for r in rows)    # head, optimum, (kept, density) x 2, choice
    for name in ("default", "vs"):
        assert any(line.startswith(f"{name}: mean kept") for line in text.splitlines())
    assert plot.stat().st_size > 1000
