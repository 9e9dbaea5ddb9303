"""`python -m sparse_attn calibrate` on wrong or thin input: one-line errors with exit code 2, and warnings when it
calibrates on random tokens or on fewer tokens than --seq-len."""
import json

import pytest

pytest.importorskip("transformers")

from sparse_attn.__main__ import main as cli  # noqa: E402
from sparse_attn.config import SparseConfig  # noqa: E402
from sparse_attn.tools.tiny_model import tiny_llama  # noqa: E402

FAST = ["--layers", "1", "--block-size", "32", "--candidates", "vs:32:64", "--target", "0.5", "--no-progress"]


def _cli(argv, capsys):
    try:
        code = cli(["calibrate", *argv])
    except SystemExit as e:                      # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "calibrate: error:" in lines[0] and fragment in lines[0], err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Llama without tokenizer files."""
    path = tmp_path_factory.mktemp("calibrate_model")
    tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2, vocab=256).save_pretrained(path)
    return path


def test_random_tokens_are_announced(tmp_path, capsys):
    out = tmp_path / "cfg.json"
    code, _, err = _cli(["--tiny", "--seq-len", "128", "-o", str(out), *FAST], capsys)
    assert code == 0 and SparseConfig.load(out).reference_length == 128
    assert "warning: no --text or --token-ids: calibrating on 128 random tokens" in err


def test_input_shorter_than_seq_len_is_announced(model_dir, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(range(3, 103))))                     # 100 tokens
    out = tmp_path / "cfg.json"
    code, _, err = _cli(["--model", str(model_dir), "--token-ids", str(ids), "--seq-len", "4096", "-o", str(out),
                         *FAST], capsys)
    assert code == 0 and SparseConfig.load(out).reference_length == 100
    assert f"--token-ids {ids} has 100 tokens, fewer than --seq-len 4096: calibrating at 100 tokens" in err
    assert "random tokens" not in err
    code, _, err = _cli(["--model", str(model_dir), "--token-ids", str(ids), "--seq-len", "64", "-o", str(out),
                         *FAST], capsys)
    assert code == 0 and "warning" not in err                          # enough tokens: nothing to say


def test_wrong_inputs_are_one_line_errors(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("some calibration text " * 50)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 99999")
    cases = [
        (["--model", str(tmp_path / "missing")], "--model"),
        (["--model", str(model_dir), "--text", str(text)], "no tokenizer files"),
        (["--model", str(model_dir), "--text", str(tmp_path / "none.txt")], "no such file"),
        (["--model", str(model_dir), "--token-ids", str(ids), "--seq-len", "3"], "outside the model's vocabulary (256)"),
        (["--tiny", "--candidates", "zz:1:2"], "--candidates: candidates: unknown pattern 'zz'"),
        (["--tiny", "--text", str(text)], "--text needs --model DIR"),
        (["--tiny", "--heads", "3"], "--heads a multiple of --kv-heads"),
        ([], "one of the arguments --model --tiny --synthetic is required"),
    ]
    for argv, fragment in cases:
        _one_line_error(*_cli([*argv, "-o", str(tmp_path / "x.json"), "--no-progress"], capsys)[::2], fragment)
