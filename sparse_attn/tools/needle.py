"""``python -m sparse_attn needle --model PATH``: needle-in-a-haystack accuracy, dense versus sparse attention.

For a local causal LM directory (weights + tokenizer, loaded with ``local_files_only=True``): for each context
length x needle depth, a filler haystack with one sentence holding a secret number at that depth, then a question;
greedy generation, scored correct when the number appears in the answer.  Runs with the model's own attention and
patched with `sparse_attn.hf.patch`, prints a table, and writes a PNG heatmap (when matplotlib is installed).
"""
from __future__ import annotations

import os
import random

import torch

from .cli import InputError, Parser, input_errors, progress, require_tokenizer
from ..errors import InvalidArgumentError

FILLER = (
    "The river bends twice before it reaches the old mill at the edge of the valley.",
    "Most of the town's bread is still baked in ovens that were built a century ago.",
    "In the spring the orchards bloom white and the bees return to the hillside hives.",
    "The library keeps its maps in wide drawers that smell faintly of cedar and dust.",
    "Trains stop at the station four times a day, and the last one leaves at dusk.",
    "A narrow bridge of grey stone crosses the stream behind the school.",
    "Children fly kites on the common whenever the wind comes in from the sea.",
    "The market opens early, and the fishmongers are always the first to arrive.",
)
NEEDLE = "The secret number is {value}."
QUESTION = " What is the secret number? The secret number is"
TINY_PARAMS = 100_000_000


def build_prompt(tokenizer, length: int, depth: float, needle: str, question: str = QUESTION) -> tuple[list, int]:
    """Token ids of exactly ``length`` tokens: filler, the needle at fraction ``depth`` of the filler, the question
    last; and the needle's first token position."""
    needle_ids = tokenizer.encode(" " + needle, add_special_tokens=False)
    question_ids = tokenizer.encode(question, add_special_tokens=False)
    prefix = tokenizer.encode("", add_special_tokens=True)                       # BOS where the model uses one
    room = length - len(prefix) - len(needle_ids) - len(question_ids)
    if room < 1:
        raise InvalidArgumentError(f"length {length} is too short for the needle and the question "
                         f"({length - room} tokens)")
    sentence_ids = tokenizer.encode(" " + " ".join(FILLER), add_special_tokens=False)
    filler = (sentence_ids * (room // max(1, len(sentence_ids)) + 1))[:room]
    at = round(depth * room)
    ids = prefix + filler[:at] + needle_ids + filler[at:] + question_ids
    return ids, len(prefix) + at


def is_correct(value: str, answer: str) -> bool:
    """Substring match of the needle's value in the generated answer (spaces ignored, as tokenizers differ)."""
    return value.replace(" ", "") in answer.replace(" ", "")


@torch.no_grad()
def run_grid(model, tokenizer, lengths, depths, *, max_new_tokens: int, seed: int, label: str = "needle"):
    """Scores [len(lengths)][len(depths)] (1 correct, 0 not) and the answers, for the model as it is; a progress
    bar named ``label`` on stderr."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id or 0
    scores, answers = [[] for _ in lengths], [[] for _ in lengths]
    cells = [(i, length, depth) for i, length in enumerate(lengths) for depth in depths]
    for i, length, depth in progress(cells, len(cells), label):
        value = str(rng.randrange(1_000_000, 10_000_000))
        ids, _ = build_prompt(tokenizer, length, depth, NEEDLE.format(value=value))
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        scores[i].append(int(is_correct(value, answer)))
        answers[i].append(answer)
    return scores, answers


def format_table(lengths, depths, dense, sparse) -> str:
    head = f"{'length':>8} | " + " ".join(f"{d:>9.2f}" for d in depths) + " |  dense  sparse"
    lines = ["cells: dense/sparse (1 = needle found); columns: needle depth", head, "-" * len(head)]
    for length, d_row, s_row in zip(lengths, dense, sparse):
        cells = " ".join(f"{f'{d}/{s}':>9}" for d, s in zip(d_row, s_row))
        lines.append(f"{length:>8} | {cells} | {sum(d_row) / len(d_row):6.2f}  {sum(s_row) / len(s_row):6.2f}")
    total = len(lengths) * len(depths)
    lines.append(f"accuracy: dense {sum(map(sum, dense)) / total:.3f}, sparse {sum(map(sum, sparse)) / total:.3f}")
    return "\n".join(lines)


def save_heatmap(path, lengths, depths, dense, sparse, title: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no heatmap written (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(depths), 1.5 + 0.5 * len(lengths)), squeeze=False)
    for ax, name, grid in zip(axes[0], ("dense", "sparse"), (dense, sparse)):
        ax.imshow(torch.tensor(grid, dtype=torch.float32).numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"heatmap written to {path}"


def _pattern(name: str):
    import sparse_attn as sa

    return {"default": None, "vs": sa.VerticalSlash(vertical=1000, slash=6096),
            "ashape": sa.AShape(sink=128, local=3968)}[name]


def load_inputs(path: str, dtype: str, config_path):
    """(tokenizer, model in eval mode, `SparseConfig` or None) from a local model directory and an optional
    config file, checked cheapest first (directory, tokenizer files, the model's config.json against the sparse
    config, then the weights) so that a wrong input fails before anything heavy loads; `InputError` naming it."""
    if not os.path.isdir(path):
        raise InputError(f"--model {path}: no such directory (a local model directory with weights and tokenizer)")
    require_tokenizer(path, "the needle prompts need the model's tokenizer")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with input_errors(f"--model {path}: cannot read its config"):
        model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    config = check_config(config_path, model_config)
    with input_errors(f"--model {path}: cannot load its tokenizer (the needle prompts need it)", OSError, ValueError,
                      TypeError):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with input_errors(f"--model {path}: cannot load the model"):
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype="auto" if dtype == "auto" else getattr(torch, dtype)).eval()
    return tokenizer, model, config


def check_config(path, model_config):
    """The `SparseConfig` at ``path`` (None without one), checked against the layers and query heads of
    ``model_config`` (a transformers config); `InputError` naming --config otherwise."""
    if path is None:
        return None
    from ..config import SparseConfig

    if not os.path.isfile(path):
        raise InputError(f"--config {path}: no such file")
    text = model_config.get_text_config(decoder=True)
    with input_errors(f"--config {path}"):
        config = SparseConfig.load(path)
        config.check_model(text.num_hidden_layers, text.num_attention_heads)
    return config


def main(argv=None):
    parser = Parser(prog="python -m sparse_attn needle", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model directory (weights and tokenizer)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="context lengths")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle depths as fractions of the haystack")
    parser.add_argument("--pattern", choices=("default", "vs", "ashape"), default="default",
                        help="sparse pattern on every head (default: the online default)")
    parser.add_argument("--config", default=None, help="a sparse config JSON (ours or MInference's) instead")
    parser.add_argument("--dense-below", type=int, default=None)
    parser.add_argument("--dense-above", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--png", default="needle.png", help="heatmap path ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    bad = [d for d in args.depths if not 0 <= d <= 1]
    if bad or min(args.lengths) < 2:
        parser.error(f"--depths must lie in [0, 1] (got {bad}) and --lengths be >= 2")

    options = {k: v for k, v in (("dense_below", args.dense_below), ("dense_above", args.dense_above))
               if v is not None}
    from ..integrations.hf.state import check_options

    with input_errors("--dense-below / --dense-above", ValueError):
        check_options(options, has_config=args.config is not None)

    import sparse_attn.hf as sah

    tokenizer, model, config = load_inputs(args.model, args.dtype, args.config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, "
          f"attention {model.config._attn_implementation}")
    if n_params < TINY_PARAMS:
        print(f"NOTE: this model is tiny (< {TINY_PARAMS // 1_000_000}M parameters): it cannot retrieve a needle, "
              f"so the scores below are meaningless; they only exercise the mechanics.")

    # Sparse first: patch checks the model, the config and the options before anything long runs.
    with input_errors("cannot patch the model", ValueError, TypeError):
        sah.patch(model, config if config is not None else _pattern(args.pattern), **options)
    try:
        sparse, _ = run_grid(model, tokenizer, args.lengths, args.depths, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, label="needle, sparse")
    finally:
        sah.unpatch(model)
    dense, _ = run_grid(model, tokenizer, args.lengths, args.depths, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, label="needle, dense")
    print(format_table(args.lengths, args.depths, dense, sparse))
    if args.png:
        label = args.config or args.pattern
        print(save_heatmap(args.png, args.lengths, args.depths, dense, sparse, f"needle: dense vs sparse ({label})"))
    return 0
