"""The commands that measure and compile ahead: `info`, `bench`, `bench-input`,
`check-attention`, `compile`; and `experiment`, the paper guide's runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from t2t_jax.cli.args import INTS, CommandLineError, add_config, add_workdir, device_summary, names

ATTENTIONS = ("auto, xla, dot_product_attention, cudnn, splash, blockwise, xla_or_blockwise")


def add_commands(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser(
        "info", help="parameters per module, mesh, batch and memory estimate of --config",
        description="Parameters per module, the mesh, the batch and a memory estimate of "
                    "--config, without training.")
    add_config(info)
    info.set_defaults(run=info_command)
    _add_bench(commands)
    _add_bench_input(commands)
    _add_check_attention(commands)
    _add_compile(commands)
    _add_experiment(commands)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="step time, tokens/s, MFU and memory against sequence length",
        description="Time the train step (or the eval step, or greedy or beam decoding) of "
                    "--config on random tokens at each sequence length and attention kernel: "
                    "tokens/s, FLOPs, MFU against the device's peak, memory, compile time.")
    add_config(bench)
    bench.add_argument("--seq_lens", type=INTS, default=[128, 256, 512, 1024, 2048, 4096, 8192],
                       metavar="N,...", help="sequence lengths")
    bench.add_argument("--attention", type=names, default=["xla", "dot_product_attention"],
                       metavar="NAME,...", help=f"attention kernels ({ATTENTIONS})")
    bench.add_argument("--mode", choices=("train", "forward", "decode"), default="train",
                       help="the train step, the eval step, or decoding with the cache")
    bench.add_argument("--batch_tokens", type=int, default=8192, help="tokens a side per step")
    bench.add_argument("--steps", type=int, default=3, help="steps timed after the warm-up")
    bench.add_argument("--beam_size", type=int, default=1,
                       help="--mode decode: beams (1: greedy)")
    bench.add_argument("--packed_examples", type=int, default=0, metavar="K",
                       help="pack K equal examples in each row (train and forward; with "
                            "--config.model.max_segments_per_row cuDNN takes them as spans)")
    bench.add_argument("--profile", metavar="DIR",
                       help="profile each point into DIR and print its device time by kind")
    bench.add_argument("--output", metavar="DIR", help="write bench.json, bench.csv and plots")
    bench.set_defaults(run=bench_command)


def _add_bench_input(commands: argparse._SubParsersAction) -> None:
    bench_input = commands.add_parser(
        "bench-input", help="input pipeline examples/s and tokens/s against the train step",
        description="The input pipeline's examples/s and tokens/s from prepared ids (padded, "
                    "packed, token budget, sampled) with each worker count, next to "
                    "SentencePiece in Python and the train step's consumption; on a generated "
                    "WMT-like corpus when --config is parallel_text without files.")
    add_config(bench_input)
    add_workdir(bench_input, "the tokenizer, the generated corpus and its prepared ids")
    bench_input.add_argument("--pairs", type=int, default=100_000,
                             help="generated sentence pairs")
    bench_input.add_argument("--batches", type=int, default=300,
                             help="batches timed per variant")
    bench_input.add_argument("--steps", type=int, default=3,
                             help="train steps timed (0: the train step is not measured)")
    bench_input.add_argument("--workers", type=INTS, default=[0, 1, 2], metavar="N,...",
                             help="input worker counts (0: a thread of this process)")
    bench_input.add_argument("--accelerator", choices=("h200", "h100", "v5e"),
                             help="also print each variant's share of what one such "
                                  "accelerator consumes")
    bench_input.add_argument("--output", metavar="DIR", help="write bench_input.json")
    bench_input.set_defaults(run=bench_input_command)


def _add_check_attention(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check-attention", help="each attention kernel against the float32 reference",
        description="Run each attention kernel on this device and compare its outputs and "
                    "gradients with the float32 einsum reference.")
    check.add_argument("--attention", type=names, default=["xla", "dot_product_attention"],
                       metavar="NAME,...", help=f"the kernels ({ATTENTIONS})")
    check.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                       default="bfloat16", help="the inputs' dtype")
    check.add_argument("--length", type=int, default=256, help="query and key length")
    check.add_argument("--output", metavar="DIR", help="write check_attention.json")
    check.set_defaults(run=check_attention_command)


def _add_compile(commands: argparse._SubParsersAction) -> None:
    compile_ = commands.add_parser(
        "compile", help="compile for a TPU topology or GPU host that is not here",
        description="Compile the train step (or decode loop) of --config for a TPU topology "
                    "or GPU host on this machine (libtpu or JAX's CUDA plugin; no TPU or GPU "
                    "needed): per-chip memory, FLOPs, kernels, collectives, estimated speed.")
    add_config(compile_)
    compile_.add_argument("--topology", required=True,
                          help="a TPU topology (v5e:4x4, v5p:4x4x4, v4:2x2x1), accelerator type "
                               "(v5e-16, v5p-128, v4-8) or GPU host (h100, h100:8, h200:8, "
                               "a100:8)")
    compile_.add_argument("--num_slices", type=int, default=1,
                          help="TPU slices, or GPU hosts, joined over the data-center network")
    compile_.add_argument("--mode", choices=("train", "decode"), default="train",
                          help="the train step, or the beam-search decode loop")
    compile_.add_argument("--rows_per_chip", type=int,
                          help="rows per data-parallel shard (default: data.batch_size)")
    compile_.add_argument("--search", action="store_true",
                          help="compile candidate meshes and remat policies; rank those that "
                               "fit by estimated tokens/s")
    compile_.add_argument("--seq_lens", type=INTS, metavar="N,...",
                          help="sequence lengths (default: the config's)")
    compile_.add_argument("--attention", type=names, metavar="NAME,...",
                          help=f"attention kernels (default: the config's; {ATTENTIONS})")
    group = compile_.add_argument_group("--mode decode")
    group.add_argument("--batch_size", type=int, default=64, help="sentences per host")
    group.add_argument("--beam_size", type=int, default=4, help="beams")
    group.add_argument("--alpha", type=float, default=0.6, help="length penalty exponent")
    group.add_argument("--extra_length", type=int, default=50,
                       help="outputs may be this many tokens longer than their input")
    compile_.add_argument("--output", metavar="DIR", help="write compile.json and compile.md")
    compile_.set_defaults(run=compile_command)


def _add_experiment(commands: argparse._SubParsersAction) -> None:
    experiment = commands.add_parser(
        "experiment", help="one of the paper guide's experiments (docs/paper_guide.md)",
        description="Run one of the paper guide's experiments and write its JSON and plots.")
    experiment.add_argument("name", help="positional, scaling, heads, attention_maps, "
                                         "rnn_vs_transformer, residual_norm or hparams")
    experiment.add_argument("--output", required=True, metavar="DIR",
                            help="where NAME.json and its plots go")
    experiment.add_argument("--smoke", action="store_true",
                            help="a seconds-long reduced run (what the tests run)")
    experiment.add_argument("--data_dir", metavar="DIR", help="TFDS data dir for the tasks")
    experiment.set_defaults(run=experiment_command)


def info_command(args: argparse.Namespace) -> None:
    from t2t_jax.perf.info import describe

    print("\n".join(describe(args.config)))


def _vocab_size(config) -> int:
    """The config's vocabulary size; the data modules (TensorFlow) load only where the config
    leaves it open."""
    if config.model.vocab_size:
        return config.model.vocab_size
    from t2t_jax.data import tasks

    return tasks.expected_vocab_size(config)


def bench_command(args: argparse.Namespace) -> None:
    from t2t_jax.perf import bench, profiling

    config = args.config

    def progress(point: bench.Point) -> None:  # rows as they come, on stderr
        print(bench.format_table([point])[-1], file=sys.stderr, flush=True)

    print(bench.format_table([])[0], file=sys.stderr, flush=True)
    points, peak_source = bench.run_bench(
        config, _vocab_size(config), args.seq_lens, args.attention, args.mode,
        args.batch_tokens, args.steps, progress, args.profile, args.beam_size,
        args.packed_examples,
    )
    print(f"devices: {device_summary()}; peak: {peak_source}")
    print("\n".join(bench.format_table(points)))
    for point in points:
        if point.profile:
            print("\n".join(profiling.format_breakdown(
                profiling.Breakdown(**point.profile),
                f"\n{point.mode} {point.attention} {point.seq_len}: trace in {args.profile}",
            )))
    if args.output:
        for path in bench.write_outputs(points, args.output, f"{config.model.type}, "
                                        f"d_model {config.model.d_model}, {device_summary()}"):
            print(f"wrote {path}")


def bench_input_command(args: argparse.Namespace) -> None:
    from t2t_jax.perf import input_bench

    config, workdir = args.config, args.workdir
    if config.data.task == "parallel_text" and not config.data.train_source:
        print(f"generating {args.pairs:,d} WMT-like sentence pairs in {workdir}/corpus")
        files = input_bench.synthetic_corpus(os.path.join(workdir, "corpus"), args.pairs)
        config.data.update(files)
    rows = input_bench.run(config, workdir, args.batches, args.steps, tuple(args.workers))
    for row in rows:
        shown = ", ".join(f"{k} {v:,.1f}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['what']:<50s} workers {row['workers']}  {shown}")
    reference = [r for r in rows if r["what"].startswith("SentencePiece")]
    packed = [r for r in rows if r["what"] == "prepared, packed"]
    if reference and packed:
        best = max(packed, key=lambda r: r["tokens_per_s"])
        print(f"prepared, packed ({best['workers']} workers): "
              f"{best['tokens_per_s'] / reference[0]['tokens_per_s']:.2f}x the tokens/s of "
              "SentencePiece in Python on the same lines")
    if args.accelerator:
        print("\n".join(input_bench.demand_ratios(rows, args.accelerator)))
    if args.output:
        print(f"wrote {input_bench.write_json(rows, args.output)}")


def check_attention_command(args: argparse.Namespace) -> None:
    from t2t_jax.perf import kernel_check

    implementations = [a for a in args.attention if a != "auto"]
    checks = kernel_check.check_kernels(implementations, args.dtype, args.length)
    print(f"devices: {device_summary()}; errors relative to the float32 einsum reference")
    print("\n".join(kernel_check.format_checks(checks)))
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        path = os.path.join(args.output, "check_attention.json")
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(c) for c in checks], f, indent=1)
        print(f"wrote {path}")


def compile_command(args: argparse.Namespace) -> None:
    from t2t_jax.perf import aot_report, aot_search

    config = args.config

    def progress(row) -> None:  # rows as they come, on stderr: compiles take minutes
        print(aot_report.format_table([row])[-1], file=sys.stderr, flush=True)

    print(aot_report.format_table([])[0], file=sys.stderr, flush=True)
    rows = aot_search.run(
        config, args.topology, _vocab_size(config), num_slices=args.num_slices, mode=args.mode,
        rows_per_chip=args.rows_per_chip, seq_lens=args.seq_lens, attentions=args.attention,
        find_mesh=args.search, decode_rows=args.batch_size, beam_size=args.beam_size,
        alpha=args.alpha, extra_length=args.extra_length, on_row=progress,
    )
    print(f"{rows[0].model}; {rows[0].mode} step; estimates are a roofline, not a measurement:"
          f" {rows[0].estimate_method or 'none'}")
    print("\n".join(aot_report.format_table(rows)))
    fitting = [r for r in rows if r.fits and r.estimated_tokens_per_s]
    if args.search:
        if fitting:
            print(f"best: {aot_search.mesh_flags(fitting[0])}")
        else:
            print("no candidate fits: use a larger topology, fewer --rows_per_chip, or "
                  "shorter sequences")
    if args.output:
        for path in aot_report.write_outputs(rows, args.output):
            print(f"wrote {path}")


def experiment_command(args: argparse.Namespace) -> None:
    from t2t_jax.guide import experiments

    if args.name not in experiments.EXPERIMENTS:
        raise CommandLineError(f"unknown experiment {args.name!r}; NAME is one of "
                               f"{', '.join(experiments.EXPERIMENTS)}")
    results = experiments.run(args.name, args.output, args.smoke, data_dir=args.data_dir)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1)[:2000])
    for name, run in results.get("runs", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in run.items() if k != "curve")
        print(f"{name:>12s}: {shown}")
    print(f"wrote {args.name}.json and its plots in {os.path.abspath(args.output)}")
