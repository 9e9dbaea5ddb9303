"""`python -m sparse_attn needle` and `demo`: mechanics on tiny random models (scores are meaningless there)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from sparse_attn.tools import needle  # noqa: E402
from sparse_attn.__main__ import main as cli  # noqa: E402


def _tokenizer():
    """A byte-free BPE trained on the filler, the needle and the question (digits are single tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[EOS]"],
                                  initial_alphabet=list("0123456789"))
    tok.train_from_iterator(list(needle.FILLER) + [needle.NEEDLE.format(value=1234567), needle.QUESTION], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("length, depth", [(97, 0.0), (150, 0.5), (150, 1.0)])
def test_prompt_has_the_length_and_the_needle_at_its_depth(length, depth):
    tok = _tokenizer()
    value = "7654321"
    ids, at = needle.build_prompt(tok, length, depth, needle.NEEDLE.format(value=value))
    needle_ids = tok.encode(" " + needle.NEEDLE.format(value=value), add_special_tokens=False)
    question_ids = tok.encode(needle.QUESTION, add_special_tokens=False)
    assert len(ids) == length
    assert ids[at:at + len(needle_ids)] == needle_ids
    assert ids[-len(question_ids):] == question_ids
    room = length - len(needle_ids) - len(question_ids)
    assert at == round(depth * room)
    with pytest.raises(ValueError, match="too short"):
        needle.build_prompt(tok, 10, depth, needle.NEEDLE.format(value=value))


def test_is_correct_and_table():
    assert needle.is_correct("1234567", " 123 4567.") and not needle.is_correct("1234567", "1234568")
    table = needle.format_table([100, 200], [0.0, 1.0], [[1, 0], [1, 1]], [[0, 0], [1, 1]])
    assert "1/0" in table and "accuracy: dense 0.750, sparse 0.500" in table


def test_needle_cli_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    png = tmp_path / "needle.png"
    assert cli(["needle", "--model", str(tiny_dir), "--lengths", "96", "160", "--depths", "0", "1",
                "--max-new-tokens", "3", "--dense-below", "0", "--dense-above", "1", "--png", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "meaningless" in out
    assert "needle, dense" in err and "needle, sparse" in err              # progress on stderr
    assert "accuracy: dense" in out and len([line for line in out.splitlines() if " | " in line]) == 3
    assert png.exists() and png.stat().st_size > 0


def _cli(argv, capsys):
    """(exit code, stdout, stderr) of ``python -m sparse_attn ARGV`` run in-process."""
    try:
        code = cli(argv)
    except SystemExit as e:                      # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


DEMO = ["demo", "--length", "300", "--new-tokens", "2", "--layers", "2", "--hidden", "64"]


def test_demo_reports_sparse_layers_and_a_speedup_only_when_sparse_ran(capsys):
    code, out, _ = _cli(DEMO + ["--dense-below", "0", "--dense-above", "1"], capsys)
    assert code == 0
    assert "speedup" in out and "sparse in layers [0, 1] (density L0:" in out and "same new tokens" in out


@pytest.mark.parametrize("extra, why", [
    ([], "dense in layers [0, 1]: the prompt (300 tokens) is below dense_below=4096"),
    (["--pattern", "default", "--dense-below", "0"], "dense in layers [0, 1]: the pre-check found attention too "
                                                     "diffuse"),
])
def test_demo_says_when_both_runs_are_dense_and_why(capsys, extra, why):
    code, out, _ = _cli(DEMO + extra, capsys)
    assert code == 0
    assert "both runs are dense attention, so there is no speedup to report" in out and why in out
    assert "speedup" not in out.replace("no speedup", "")


@pytest.mark.parametrize("argv, fragments", [
    (["demo", "--heads", "3"], ["--heads (3) must be a multiple of --kv-heads (2)"]),
    (["demo", "--dense-above", "3"], ["dense_above must be a number in (0, 1]"]),
    (["demo", "--length", "x"], ["--length", "invalid int value"]),
    (["nope"], ["unknown command 'nope'"]),
    (["needle"], ["required: --model"]),
    (["needle", "--model", "/no/such/dir"], ["--model /no/such/dir: no such directory"]),
])
def test_input_errors_are_one_line_with_exit_code_2(capsys, argv, fragments):
    _one_line_error(*_cli(argv, capsys)[::2], *fragments)


def test_needle_without_a_tokenizer_is_an_input_error(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    capsys.readouterr()                                                     # the save's own progress bar
    _one_line_error(*_cli(["needle", "--model", str(tmp_path)], capsys)[::2], "no tokenizer files")


def test_needle_config_errors_come_before_any_run(tiny_dir, tmp_path, capsys):
    from sparse_attn.config import SparseConfig
    import sparse_attn as sa

    wrong = tmp_path / "three_heads.json"
    SparseConfig.uniform(sa.AShape(sink=4, local=16), 2, 3).save(wrong)      # the model has 4 query heads
    code, out, err = _cli(["needle", "--model", str(tiny_dir), "--config", str(wrong), "--png", ""], capsys)
    _one_line_error(code, err, f"--config {wrong}", "the model has 4 query heads per layer, the config has 3")
    assert "accuracy" not in out and "needle," not in err                   # nothing ran
    _one_line_error(*_cli(["needle", "--model", str(tiny_dir), "--config", str(tmp_path / "none.json")],
                          capsys)[::2], "no such file")
    _one_line_error(*_cli(["needle", "--model", str(tiny_dir), "--dense-above", "2"], capsys)[::2],
                    "dense_above must be a number in (0, 1]")
