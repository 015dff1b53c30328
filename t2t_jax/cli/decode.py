"""The commands on trained checkpoints: `decode`, `evaluate`, `score`, `average`, `attention`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from t2t_jax.cli.args import FLOATS, INTS, CommandLineError, add_workdir, one, read_lines

WORKDIRS = ("the run's workdir; DIR1,DIR2,... decode as an ensemble (one tokenizer, one model "
            "type)")


def add_restore(parser: argparse.ArgumentParser, ensembles: bool = True,
                required: bool = True) -> None:
    """--workdir (several: an ensemble), --step and --average: which params to restore."""
    add_workdir(parser, WORKDIRS if ensembles else "the run's workdir", required)
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--average", type=int, default=1, metavar="N",
                        help="the mean params of each workdir's newest N checkpoints (up to "
                             "--step), averaged in memory, e.g. --workdir RUN/average_pool "
                             "--average 5")


def _add_search(parser: argparse.ArgumentParser, sweeps: bool) -> None:
    sweep = " (a list sweeps: 1,4,8)" if sweeps else ""
    parser.add_argument("--beam_size", type=INTS, default=[4], metavar="N" + (",..." * sweeps),
                        help=f"beams; 1 is greedy{sweep}")
    parser.add_argument("--alpha", type=FLOATS, default=[0.6], metavar="A" + (",..." * sweeps),
                        help="GNMT length penalty exponent" + (" (a list sweeps)" * sweeps))
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--extra_length", type=int, default=50,
                        help="outputs may be this many tokens longer than their input")
    group = parser.add_argument_group("sampling instead of search")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="above 0: sample at this temperature (one output per input)")
    group.add_argument("--top_k", type=int, default=0, help="only the k likeliest tokens")
    group.add_argument("--top_p", type=float, default=1.0, help="the nucleus probability mass")
    group.add_argument("--seed", type=int, default=0, help="the sampling seed")


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_decode(commands)
    _add_evaluate_and_score(commands)
    _add_average_and_attention(commands)


def _add_decode(commands: argparse._SubParsersAction) -> None:
    decode = commands.add_parser(
        "decode", help="translate lines with a checkpoint (or an ensemble)",
        description="Translate each input line with the workdir's checkpoint. With no --input "
                    "on a terminal, each line typed is answered as it comes.")
    add_restore(decode, required=False)
    decode.add_argument("--input", default="-", metavar="FILE",
                        help="source lines, or - for stdin")
    decode.add_argument("--output", metavar="FILE", help="where to write (default: stdout)")
    decode.add_argument("--target_prefix", metavar="FILE",
                        help="forced decoding: one target prefix a line, aligned with the input "
                             "(an empty line: none); each hypothesis starts with its prefix, "
                             "whose tokens its scores leave out")
    decode.add_argument("--engine", choices=("jax", "ctranslate2"), default="jax",
                        help="ctranslate2: decode an export (t2t-jax export) with CTranslate2, "
                             "re-ranked by our length penalty")
    decode.add_argument("--export_dir", metavar="DIR",
                        help="the export --engine ctranslate2 reads")
    decode.add_argument("--nbest", type=int, default=1, metavar="N",
                        help="the N best hypotheses per input, with scores (needs --beam_size N "
                             "or more)")
    decode.add_argument("--format", choices=("auto", "plain", "nbest", "jsonl"), default="auto",
                        help="plain: one line per input; nbest: 'index ||| hypothesis ||| "
                             "log_prob ||| score'; jsonl; auto: plain for --nbest 1, else nbest")
    _add_search(decode, sweeps=False)
    decode.set_defaults(run=decode_command)


def _add_evaluate_and_score(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="decode a split; BLEU, chrF and speed per search setting",
        description="Decode the config's --split with each beam size and alpha asked for, and "
                    "print BLEU (sacrebleu), chrF, exact matches and speed; the hypotheses are "
                    "written into the first workdir.")
    add_restore(evaluate)
    evaluate.add_argument("--split", default="test", help="the split to decode and score")
    _add_search(evaluate, sweeps=True)
    evaluate.set_defaults(run=evaluate_command)

    score = commands.add_parser(
        "score", help="each sentence pair's log-probability under the model",
        description="Teacher-forced log-probabilities of target lines given source lines, in "
                    "input order: total, per token, tokens.")
    add_restore(score, ensembles=False)
    score.add_argument("--source", required=True, metavar="FILE", help="source lines")
    score.add_argument("--target", required=True, metavar="FILE",
                       help="target lines, one per source line")
    score.add_argument("--output", metavar="FILE", help="where to write (default: stdout)")
    score.add_argument("--format", choices=("plain", "jsonl"), default="plain",
                       help="plain: 'log_prob<TAB>per_token<TAB>tokens'; jsonl")
    score.add_argument("--batch_size", type=int, default=64, help="pairs per batch")
    score.set_defaults(run=score_command)


def _add_average_and_attention(commands: argparse._SubParsersAction) -> None:
    average = commands.add_parser(
        "average", help="average the newest checkpoints' params into a new workdir",
        description="Average the params of --workdir's newest --last checkpoints and save them "
                    "as a workdir of their own, which decode, evaluate and score read.")
    add_workdir(average, "the run's workdir")
    average.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints")
    average.add_argument("--output", required=True, metavar="DIR", help="the new workdir")
    average.set_defaults(run=average_command)

    attention = commands.add_parser(
        "attention", help="attention heat maps of each head for one input",
        description="Decode one input with the workdir's checkpoint and draw every layer's "
                    "and head's attention weights.")
    add_workdir(attention, "the run's workdir")
    attention.add_argument("--text", "--input", dest="text", default="3 1 4 1 5 9 2 6",
                           help="the input sentence")
    attention.add_argument("--output", metavar="DIR",
                           help="where attention_maps.png goes (default: WORKDIR/attention_maps)")
    attention.set_defaults(run=attention_command)


def _workdirs(args: argparse.Namespace) -> list[str]:
    return [w for w in args.workdir.split(",") if w]


def _decode_options(args: argparse.Namespace, beam_size: int, alpha: float, nbest: int = 1):
    """The search flags as DecodeOptions; sampling (--temperature) searches no beams."""
    from t2t_jax.decode import DecodeOptions, Search

    sampling = args.temperature > 0
    search = Search(1 if sampling else beam_size, alpha, nbest, args.temperature, args.top_k,
                    args.top_p)
    return DecodeOptions(search, args.seed, args.batch_size, args.extra_length)


def format_hypotheses(index: int, hypotheses: list, form: str) -> str:
    """One input's hypotheses as text: `plain` its best, `nbest` one
    'index ||| hypothesis ||| log_prob ||| score' line each, `jsonl` one JSON object each."""
    if form == "plain":
        return hypotheses[0].text + "\n"
    if form == "nbest":
        return "".join(f"{index} ||| {h.text} ||| {h.log_prob:.4f} ||| {h.score:.4f}\n"
                       for h in hypotheses)
    return "".join(json.dumps({"index": index, "rank": rank, "text": h.text,
                               "log_prob": round(h.log_prob, 6), "score": round(h.score, 6),
                               "tokens": len(h.ids) + 1}) + "\n"
                   for rank, h in enumerate(hypotheses))


def _write(text: str, output: str | None) -> None:
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def decode_command(args: argparse.Namespace) -> None:
    from t2t_jax.decode import load_decoder, translate, translate_stream

    # Flags are checked before the (slow) restore: a mistake costs no wait.
    options = _decode_options(args, one(args.beam_size, "beam_size"), one(args.alpha, "alpha"),
                              args.nbest)
    form = args.format if args.format != "auto" else ("plain" if args.nbest == 1 else "nbest")
    lines = None if args.input == "-" and sys.stdin.isatty() else read_lines(args.input, "input")
    prefixes = None
    if args.target_prefix:
        if lines is None:
            raise CommandLineError("--target_prefix needs --input FILE (or piped input): the "
                                   "prefixes line up with the input's lines")
        prefixes = read_lines(args.target_prefix, "target_prefix")
        if len(prefixes) != len(lines):
            raise CommandLineError(f"--target_prefix has {len(prefixes)} lines and --input "
                                   f"{len(lines)}: give one prefix a line (an empty line: none)")
    if args.engine == "ctranslate2":
        return _decode_with_ctranslate2(args, options, form, lines, prefixes)
    if not args.workdir:
        raise CommandLineError("decode needs --workdir DIR (or --engine ctranslate2 "
                               "--export_dir DIR)")
    decoder = load_decoder(_workdirs(args), args.step, args.average)
    what = "sampling" if options.search.temperature > 0 else f"beam {options.search.beam_size}"
    if lines is None and not args.output:
        # A person typing: each line is translated as soon as it is entered.
        print(f"step {decoder.step}, {what}: type a line, Ctrl-D to end", file=sys.stderr)
        index = iter(range(1 << 62))

        def write(hypotheses):
            sys.stdout.write(format_hypotheses(next(index), hypotheses, form))
            sys.stdout.flush()

        def warn(message: str) -> None:  # a person can retype the line
            print(f"t2t-jax decode: error: {message}", file=sys.stderr, flush=True)

        translate_stream(decoder, sys.stdin, write, options, on_error=warn)
        return
    if lines is None:
        lines = read_lines(args.input, "input")
    results, stats = translate(decoder, lines, options, sys.stderr.isatty(), prefixes)
    _write("".join(format_hypotheses(i, h, form) for i, h in enumerate(results)), args.output)
    ensemble = f", ensemble of {len(decoder.models)}" if len(decoder.models) > 1 else ""
    print(f"decoded {len(lines)} lines with step {decoder.step} ({what}{ensemble}): "
          f"{stats['sentences_per_s']:.1f} sentences/s, {stats['tokens_per_s']:.1f} tokens/s",
          file=sys.stderr)


def _decode_with_ctranslate2(args, options, form, lines, prefixes) -> None:
    import time

    from t2t_jax.export.ctranslate2_engine import CTranslate2Engine

    if not args.export_dir:
        raise CommandLineError("--engine ctranslate2 needs --export_dir DIR (made by t2t-jax "
                               "export)")
    if options.search.temperature > 0:
        raise CommandLineError("--engine ctranslate2 searches (greedy or beam); sampling is "
                               "the jax engine's")
    if lines is None:
        lines = read_lines(args.input, "input")
    search = options.search
    try:
        engine = CTranslate2Engine(args.export_dir, [search.beam_size], args.batch_size,
                                   args.extra_length)
    except ImportError as error:
        raise CommandLineError(str(error)) from None
    start = time.perf_counter()
    results = engine.translate(engine.encode(lines, prefixes), search.beam_size, search.alpha)
    seconds = max(time.perf_counter() - start, 1e-9)
    results = [hypotheses[: search.nbest] for hypotheses in results]
    _write("".join(format_hypotheses(i, h, form) for i, h in enumerate(results)), args.output)
    tokens = sum(len(h[0].ids) + 1 for h in results)
    print(f"decoded {len(lines)} lines with CTranslate2 ({engine.translator.compute_type}, "
          f"beam {search.beam_size}): {len(lines) / seconds:.1f} sentences/s, "
          f"{tokens / seconds:.1f} tokens/s", file=sys.stderr)


def evaluate_command(args: argparse.Namespace) -> None:
    from t2t_jax import bleu
    from t2t_jax.data import tasks
    from t2t_jax.decode import best_texts, load_decoder, translate

    workdirs = _workdirs(args)
    decoder = load_decoder(workdirs, args.step, args.average)
    data = decoder.config.data
    builder = tasks.builder_from_config(data, split=args.split)
    # In the file's line order: the hypotheses file lines up with the user's test files.
    sources, references = tasks.text_examples(builder, args.split, data)
    settings = [(b, a) for b in args.beam_size for a in args.alpha]
    rows = []
    for beam_size, alpha in settings:  # one compilation per setting
        outputs, stats = translate(decoder, sources, _decode_options(args, beam_size, alpha),
                                   sys.stderr.isatty())
        outputs = best_texts(outputs)
        score, signature = bleu.corpus_bleu(outputs, references)
        chrf, chrf_signature = bleu.corpus_chrf(outputs, references)
        exact = sum(o == r for o, r in zip(outputs, references, strict=True))
        suffix = "" if len(settings) == 1 else f"_beam{beam_size}_alpha{alpha:g}"
        path = os.path.join(workdirs[0], f"hypotheses_{args.split}_step{decoder.step}"
                            f"{f'_average{args.average}' if args.average > 1 else ''}"
                            f"{'_ensemble' if len(workdirs) > 1 else ''}{suffix}.txt")
        _write("".join(line + "\n" for line in outputs), path)
        rows.append((beam_size, alpha, score, chrf, exact / max(len(sources), 1),
                     stats["sentences_per_s"], stats["tokens_per_s"], path))
    models = f"ensemble of {len(workdirs)}" if len(workdirs) > 1 else "one model"
    if args.average > 1:
        models += (", each" if len(workdirs) > 1 else ",") + (
            f" the average of its newest {args.average} checkpoints")
    print(f"{len(sources)} {args.split} sentences, step {decoder.step}, {models}")
    print(f"BLEU: {signature}")
    print(f"chrF: {chrf_signature}")
    print(f"{'beam':>4s} {'alpha':>5s} {'BLEU':>6s} {'chrF':>6s} {'exact':>6s} "
          f"{'sent/s':>8s} {'tok/s':>9s}  hypotheses")
    for beam_size, alpha, score, chrf, exact, sentences, tokens, path in rows:
        print(f"{beam_size:4d} {alpha:5.2f} {score:6.2f} {chrf:6.2f} {exact:6.4f} "
              f"{sentences:8.1f} {tokens:9.1f}  {path}")


def score_command(args: argparse.Namespace) -> None:
    from t2t_jax.decode import load_decoder
    from t2t_jax.scoring import score_pairs

    if "," in args.workdir:
        raise CommandLineError("score takes one model: pass a single --workdir")
    sources = read_lines(args.source, "source")
    targets = read_lines(args.target, "target")
    decoder = load_decoder(args.workdir, args.step, args.average)
    scores, stats = score_pairs(decoder, sources, targets, args.batch_size)
    if args.format == "jsonl":
        text = "".join(json.dumps({"index": i, "log_prob": round(s.log_prob, 6),
                                   "per_token": round(s.per_token, 6), "tokens": s.tokens})
                       + "\n" for i, s in enumerate(scores))
    else:
        text = "".join(f"{s.log_prob:.6f}\t{s.per_token:.6f}\t{s.tokens}\n" for s in scores)
    _write(text, args.output)
    total = sum(s.log_prob for s in scores)
    tokens = sum(s.tokens for s in scores)
    perplexity = math.exp(-total / tokens) if tokens else float("inf")
    print(f"scored {len(scores)} pairs, {tokens} target tokens with step {decoder.step}: "
          f"log-prob {total:.2f}, perplexity {perplexity:.3f}; {stats['pairs_per_s']:.1f} "
          f"pairs/s", file=sys.stderr)


def average_command(args: argparse.Namespace) -> None:
    from t2t_jax.checkpoint import average_checkpoints

    steps = average_checkpoints(args.workdir, args.last, args.output)
    print(f"averaged the params of steps {steps} into {os.path.abspath(args.output)}")


def attention_command(args: argparse.Namespace) -> None:
    from t2t_jax.guide import attention_maps

    output = args.output or os.path.join(args.workdir, "attention_maps")
    results = attention_maps.attention_maps(output, False, workdir=args.workdir,
                                            text=args.text)
    print(f"{' '.join(results['source'])} -> {' '.join(results['output'])}")
    print(f"wrote {os.path.join(os.path.abspath(output), 'attention_maps.png')}")
