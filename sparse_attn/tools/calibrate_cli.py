"""``python -m sparse_attn calibrate``: per-head pattern search on a model's (or the synthetic workload's)
calibration input, written as a config JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .calibrate import DEFAULT_TARGET, calibrate_model, calibrate_qk
from .cli import InputError, Parser, input_errors, require_tokenizer, warn
from .calibrate_candidates import parse_candidates, parse_modality
from .tiny_model import tiny_llama


PROG = "python -m sparse_attn calibrate"


def _token_ids(path: Path) -> list[int]:
    text = _read(path, "--token-ids").strip()
    try:
        ids = json.loads(text) if text.startswith("[") else [int(t) for t in text.split()]
    except ValueError as e:
        raise InputError(f"--token-ids {path}: expected a JSON list or whitespace-separated integers ({e})") from None
    if not ids or not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise InputError(f"--token-ids {path}: expected non-negative integers")
    return ids


def _read(path: Path, option: str) -> str:
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file")
    with input_errors(f"{option} {path}", OSError, UnicodeDecodeError):
        return path.read_text()


def _tokens(args) -> tuple:
    """(token ids or None for random ones, where they come from), read before the model loads; warns when they
    are random or fewer than --seq-len."""
    if args.text:
        from transformers import AutoTokenizer
        text = _read(Path(args.text), "--text")
        require_tokenizer(args.model, "--text needs the model's tokenizer")
        with input_errors(f"--model {args.model}: cannot load its tokenizer (--text needs it)", OSError, ValueError,
                          TypeError):
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids, source = tokenizer(text)["input_ids"], f"--text {args.text}"
    elif args.token_ids:
        ids, source = _token_ids(Path(args.token_ids)), f"--token-ids {args.token_ids}"
    else:
        warn(PROG, f"no --text or --token-ids: calibrating on {args.seq_len} random tokens, whose attention is not "
                   f"that of real text, so the config may keep too little or too much for real inputs; pass "
                   f"--text FILE (a few thousand tokens of the kind of text the model will see)")
        return None, "random tokens"
    if not ids:
        raise InputError(f"{source}: no tokens")
    if len(ids) < args.seq_len:
        warn(PROG, f"{source} has {len(ids)} tokens, fewer than --seq-len {args.seq_len}: calibrating at {len(ids)} "
                   f"tokens, so the budgets are measured for that length (give a longer text for long inputs)")
    return ids[:args.seq_len], source


def _check_vocab(ids, source: str, vocab: int) -> None:
    if ids is not None and max(ids) >= vocab:
        raise InputError(f"{source}: token id {max(ids)} is outside the model's vocabulary ({vocab})")


def _input_ids(ids, source: str, args, vocab: int) -> torch.Tensor:
    """[1, L] token ids for the model: ``ids`` checked against its vocabulary, or random tokens."""
    _check_vocab(ids, source, vocab)
    if ids is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (1, args.seq_len), generator=gen)
    return torch.tensor([ids], dtype=torch.long)


def main(argv=None):
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local transformers model directory (causal LM)")
    src.add_argument("--tiny", action="store_true", help="a small random-weight Llama built from a config")
    src.add_argument("--synthetic", action="store_true",
                     help="no model: the synthetic workload's q/k for each layer (sparse_attn.tools.synthetic)")
    inp = parser.add_mutually_exclusive_group()
    inp.add_argument("--text", help="calibration text file (tokenized with --model's tokenizer)")
    inp.add_argument("--token-ids", help="file of token ids (JSON list or whitespace-separated)")
    parser.add_argument("--seq-len", type=int, default=4096, help="calibration length (text/ids are cut to it; "
                        "random tokens / synthetic use it)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="recall each head must reach")
    parser.add_argument("--candidates", help="e.g. 'vs:256:512,ashape:64:1024,bs:8' (default: sized to seq-len)")
    parser.add_argument("--fallback", choices=("dense", "best"), default="dense",
                        help="a head no candidate serves: run it dense, or take the best-recall candidate")
    parser.add_argument("--block-size", type=int, default=64, help="block_m = block_n of the layouts")
    parser.add_argument("--no-length-scaling", action="store_true",
                        help="write fixed budgets (no reference_length; always so with --format minference)")
    parser.add_argument("-o", "--output", default="sparse_config.json")
    parser.add_argument("--format", choices=("sparse_attn", "minference"), default="sparse_attn")
    parser.add_argument("--plot", help="write a PNG of the chosen patterns per layer/head")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2, help="--tiny / --synthetic: number of layers")
    parser.add_argument("--heads", type=int, default=4, help="--tiny / --synthetic: query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="--tiny / --synthetic: key/value heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--modality", help="spans of the calibration input, e.g. '0:1000:text,1000:30000:video:576' "
                        "(START:END:KIND[:FRAME_TOKENS]); adds the modality patterns to the default candidates")
    parser.add_argument("--workload", choices=("text", "mixed"), default="text",
                        help="--synthetic: the text workload, or text / video frames / text with its spans "
                        "(sparse_attn.tools.synthetic.make_mixed_qkv; modality candidates are added)")
    parser.add_argument("--frame-tokens", type=int, default=576, help="--workload mixed: tokens per video frame")
    args = parser.parse_args(argv)
    if args.text and args.tiny:
        parser.error("--text needs --model DIR (its tokenizer)")
    if args.seq_len < 2 or args.layers < 1 or args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error("--seq-len must be >= 2, --layers/--heads/--kv-heads >= 1 and --heads a multiple of --kv-heads")
    with input_errors("--candidates", ValueError):
        candidates = parse_candidates(args.candidates) if args.candidates else None
    with input_errors("--modality", ValueError):
        modality = parse_modality(args.modality) if args.modality else None
    if args.model and not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: no such directory (a local transformers model directory)")
    if args.workload == "mixed" and (not args.synthetic or modality is not None):
        parser.error("--workload mixed needs --synthetic and brings its own spans (no --modality)")
    # The MInference schema has no reference length: its budgets are fixed.
    scale_with_length = not args.no_length_scaling and args.format == "sparse_attn"
    common = dict(target=args.target, fallback=args.fallback, block_m=args.block_size, block_n=args.block_size,
                  scale_with_length=scale_with_length, progress=not args.no_progress)

    if args.synthetic:
        from .synthetic import MixedWorkload, Workload, make_mixed_qkv, make_qkv
        if args.text or args.token_ids:
            parser.error("--synthetic takes no --text / --token-ids")
        layers = []
        for i in range(args.layers):
            if args.workload == "mixed":
                L = args.seq_len
                q, k, _, modality = make_mixed_qkv(MixedWorkload(
                    q_heads=args.heads, kv_heads=args.kv_heads, seq_len=L, head_dim=64, seed=args.seed + i,
                    text_before=min(1000, L // 8), text_after=min(1500, L // 8), frame_tokens=args.frame_tokens),
                    device=args.device)
            else:
                q, k, _ = make_qkv(Workload(q_heads=args.heads, kv_heads=args.kv_heads, seq_len=args.seq_len,
                                            head_dim=64, seed=args.seed + i), device=args.device)
            layers.append((q, k))
        result = calibrate_qk(layers, candidates, metadata={"source": f"synthetic {args.workload} workload"},
                              modality=modality, **common)
    else:
        tokens, tokens_source = _tokens(args)
        dtype = getattr(torch, args.dtype)
        if args.tiny:
            model = tiny_llama(args.layers, heads=args.heads, kv_heads=args.kv_heads, seed=args.seed)
            source = "tiny random-weight Llama"
        else:
            import transformers
            from transformers import AutoConfig, AutoModelForCausalLM
            with input_errors(f"--model {args.model}: cannot read its config"):
                text_config = AutoConfig.from_pretrained(args.model).get_text_config(decoder=True)
            _check_vocab(tokens, tokens_source, text_config.vocab_size)       # before the weights load
            dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            with input_errors(f"--model {args.model}: cannot load the model"):
                model = AutoModelForCausalLM.from_pretrained(args.model, **{dtype_key: dtype}).eval()
            source = args.model
        model = model.to(device=args.device, dtype=dtype)
        vocab = model.get_input_embeddings().num_embeddings
        ids = _input_ids(tokens, tokens_source, args, vocab)
        result = calibrate_model(model, ids, candidates, metadata={"source": source}, modality=modality, **common)

    result.config.save(args.output, format=args.format)
    print(result.summary())
    print(f"config ({args.format} schema) written to {args.output}")
    if args.plot:
        result.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0
