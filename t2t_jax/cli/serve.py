"""The commands that take a trained model to production: `serve` (an HTTP translation server
with dynamic batching), `loadtest` (bounded load on a local one) and `export` (to
CTranslate2, with int8 if asked)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from t2t_jax.cli.args import INTS, CommandLineError, read_lines
from t2t_jax.cli.decode import add_restore

MISSING_EXTRA = "serving needs the serve extra: pip install -e '.[serve]'"


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="an HTTP translation server with dynamic batching",
        description="Serve POST /v1/translate, GET /health and GET /metrics. Sentences of "
                    "concurrent requests are batched together; every batch shape is compiled "
                    "before /health says ready. SIGTERM finishes the requests in flight.")
    add_restore(serve, required=False)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="the port (0: a free one)")
    serve.add_argument("--beam_sizes", type=INTS, default=[1, 4], metavar="N,...",
                       help="the beam sizes compiled and served (1 is greedy)")
    serve.add_argument("--beam_size", type=int, help="a request's default beam size (default: "
                       "4 if served, else the largest of --beam_sizes)")
    serve.add_argument("--alpha", type=float, default=0.6,
                       help="a request's default GNMT length penalty exponent")
    serve.add_argument("--max_batch", type=int, default=32,
                       help="the most sentences one search holds")
    serve.add_argument("--max_wait_ms", type=float, default=5.0,
                       help="how long a sentence waits for others to fill its batch")
    serve.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                       help="continuous: greedy requests decode in --max_batch slots, each "
                            "refilled as soon as its sentence ends (JAX engine, "
                            "encoder-decoder); static: every search is one batch")
    serve.add_argument("--max_queue", type=int, default=1024,
                       help="sentences waiting beyond this get 503 with Retry-After")
    serve.add_argument("--max_request_sentences", type=int, default=256,
                       help="the most sentences one request may send")
    serve.add_argument("--extra_length", type=int, default=50,
                       help="outputs may be this many tokens longer than their input")
    serve.add_argument("--max_source_length", type=int, metavar="N",
                       help="cut inputs to N tokens, below the model's own length (fewer "
                            "shapes to compile; default: the model's)")
    serve.add_argument("--engine", choices=("jax", "ctranslate2"), default="jax",
                       help="ctranslate2: serve an export (--export_dir) with CTranslate2")
    serve.add_argument("--export_dir", metavar="DIR", help="the export --engine ctranslate2 "
                       "serves")
    serve.set_defaults(run=serve_command)
    _add_export(commands)

    load = commands.add_parser(
        "loadtest", help="bounded load on a local server: throughput and latency",
        description="Post --requests requests at each --concurrency to a server on this "
                    "machine, and print sentences/s, tokens/s and latency p50/p90/p99; with "
                    "--baseline_url (the same model served with --max_batch 1), the speedup "
                    "of dynamic batching.")
    load.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    load.add_argument("--baseline_url", help="the same server with --max_batch 1")
    load.add_argument("--input", required=True, metavar="FILE", help="source lines to send")
    load.add_argument("--concurrency", type=INTS, default=[1, 8, 64], metavar="N,...",
                      help="clients sending at once")
    load.add_argument("--requests", type=int, default=256, help="requests per concurrency")
    load.add_argument("--sentences_per_request", type=int, default=1,
                      help="lines in each request")
    load.add_argument("--beam_size", type=int, help="the requests' beam size (default: the "
                      "server's)")
    load.set_defaults(run=loadtest_command)


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="a checkpoint as a CTranslate2 model (float32 or int8)",
        description="Convert the workdir's checkpoint (or the mean of its newest --average) "
                    "into a CTranslate2 model directory with its vocabulary and tokenizer, "
                    "which decode and serve read with --engine ctranslate2 --export_dir.")
    add_restore(export, ensembles=False)
    export.add_argument("--format", choices=("ctranslate2",), default="ctranslate2",
                        help="the runtime to export for")
    export.add_argument("--output", required=True, metavar="DIR", help="the export directory")
    export.add_argument("--quantization", default="float32",
                        help="weights: float32, int8, int8_float32, int16, float16, bfloat16")
    export.add_argument("--force", action="store_true", help="replace an existing --output")
    export.set_defaults(run=export_command)


def export_command(args: argparse.Namespace) -> None:
    import jax

    from t2t_jax.decode import load_decoder
    from t2t_jax.export.ctranslate2_spec import QUANTIZATIONS, check_exportable

    try:
        import ctranslate2  # noqa: F401

        from t2t_jax.export.ctranslate2_spec import export_ctranslate2
    except ImportError as error:
        raise CommandLineError(f"export needs its extra: pip install -e '.[ctranslate2]' "
                               f"({error})") from None
    if args.quantization not in QUANTIZATIONS:
        raise CommandLineError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
    decoder = load_decoder(args.workdir, args.step, args.average)
    config = decoder.model.config
    check_exportable(config)
    settings = {"max_source_length": decoder.max_source_length, "step": decoder.step,
                "workdir": os.path.abspath(args.workdir), "average": args.average}
    output = export_ctranslate2(config, jax.device_get(decoder.params[0]), decoder.tokenizer,
                                args.output, settings, args.quantization, args.force)
    size = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
    print(f"exported step {decoder.step} ({args.quantization}) to {os.path.abspath(output)}: "
          f"{size / 1e6:.1f} MB")


def _default_beam(args: argparse.Namespace) -> int:
    if args.beam_size is not None:
        if args.beam_size not in args.beam_sizes:
            raise CommandLineError(f"--beam_size {args.beam_size} is not in --beam_sizes "
                                   f"{','.join(map(str, args.beam_sizes))}")
        return args.beam_size
    return 4 if 4 in args.beam_sizes else max(args.beam_sizes)


def serve_command(args: argparse.Namespace) -> None:
    try:
        from t2t_jax.serving import server
    except ImportError as error:
        raise CommandLineError(f"{MISSING_EXTRA} ({error})") from None
    if not args.workdir and args.engine == "jax":
        raise CommandLineError("serve needs --workdir DIR (or --engine ctranslate2 "
                               "--export_dir DIR)")
    if not args.beam_sizes or min(args.beam_sizes) < 1:
        raise CommandLineError("--beam_sizes needs beam sizes of at least 1, e.g. 1,4")
    settings = server.ServerSettings(_default_beam(args), args.alpha, args.max_wait_ms,
                                     args.max_queue, args.max_request_sentences)
    engine = _ctranslate2_engine(args) if args.engine == "ctranslate2" else _jax_engine(args)
    server.serve(server.create_app(engine, settings), args.host, args.port)


def _jax_engine(args: argparse.Namespace):
    from t2t_jax.decode import load_decoder
    from t2t_jax.serving.engine import JaxEngine

    if args.max_batch < 1:
        raise CommandLineError(f"--max_batch must be at least 1, got {args.max_batch}")
    workdirs = [w for w in args.workdir.split(",") if w]
    decoder = load_decoder(workdirs, args.step, args.average)
    if args.max_source_length:
        decoder = dataclasses.replace(decoder, max_source_length=min(
            args.max_source_length, decoder.max_source_length))
    return JaxEngine(decoder, args.beam_sizes, args.max_batch, args.extra_length,
                     continuous=args.batching == "continuous")


def _ctranslate2_engine(args: argparse.Namespace):
    from t2t_jax.export.ctranslate2_engine import CTranslate2Engine

    if not args.export_dir:
        raise CommandLineError("--engine ctranslate2 needs --export_dir DIR (made by t2t-jax "
                               "export)")
    try:
        return CTranslate2Engine(args.export_dir, args.beam_sizes, args.max_batch,
                                 args.extra_length, max_source_length=args.max_source_length)
    except ImportError as error:
        raise CommandLineError(str(error)) from None


def loadtest_command(args: argparse.Namespace) -> None:
    try:
        from t2t_jax.serving.loadtest import check_loopback, run_load, table
    except ImportError as error:
        raise CommandLineError(f"{MISSING_EXTRA} ({error})") from None
    for url in filter(None, (args.url, args.baseline_url)):
        check_loopback(url)
    lines = [line for line in read_lines(args.input, "input") if line.strip()]
    extra = {} if args.beam_size is None else {"beam_size": args.beam_size}
    results = run_load(args.url, lines, args.concurrency, args.requests,
                       args.sentences_per_request, extra)
    baseline = None
    if args.baseline_url:
        baseline = run_load(args.baseline_url, lines, args.concurrency, args.requests,
                            args.sentences_per_request, extra)
    print(table(results, baseline))
    if any(r.errors for r in results + (baseline or [])):
        print("some requests failed: see the server's log", file=sys.stderr)
