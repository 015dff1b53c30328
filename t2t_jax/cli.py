"""`t2t-jax`: one command line, thin subcommands over the library.

  t2t-jax train --config configs/reverse.py --workdir DIR [--config.model.num_heads=4 ...]
  t2t-jax prepare --config configs/wmt14_ende_base.py --workdir DIR
  t2t-jax info  --config configs/base.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

# Quiet TensorFlow's C++ start-up chatter; TF serves only TFDS, `prepare` and gs:// files here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from t2t_jax.runtime import host_allocator  # noqa: E402
from t2t_jax.runtime.xla_flags import with_default_xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = with_default_xla_flags(os.environ.get("XLA_FLAGS", ""))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override fields with --config.a.b=value."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")

USAGE = """usage: t2t-jax COMMAND --config FILE [--config.key=value ...] [--workdir DIR]

commands:
  train   train (or resume) in --workdir on --config
  prepare download --config's datasets, train its tokenizer into --workdir, and tokenize the
          data once into prepared ids beside it (train does this on first use)
  info    parameters per module, mesh, batch and memory estimate of --config
  decode  --workdir DIR[,DIR2 ensemble] [--step N] [--input FILE|-] [--output FILE]
          [--beam_size 4] [--alpha 0.6] [--nbest N] [--format plain|nbest|jsonl]
          [--temperature T --top_k K --top_p P]; no --input on a terminal: line by line
  evaluate --workdir DIR[,DIR2] [--split test] [--beam_size 1,4,8] [--alpha 0.6,1.0]
          [--average N]: decode a split, print BLEU, chrF and speed per setting, write the
          hypotheses; --average N (decode and score too): the mean of the newest N checkpoints
  score   --workdir DIR --source F --target F [--format jsonl]: each pair's log-prob under
          the model (total, per token, tokens), in input order
  average --workdir DIR --last 5 --output DIR2: average the newest checkpoints' params
  bench   --config X --seq_lens 128,256 [--attention xla,...] [--mode train] [--output DIR]
          [--profile DIR]: device time by kind (matmul, attention, loss, dropout, idle...)
          [--packed_examples K]: rows of K packed examples
  check-attention [--attention cudnn,blockwise,...] [--dtype bfloat16] [--length 256]: each
          attention kernel against the float32 einsum reference on this device
  experiment NAME --output DIR [--smoke]: the paper guide's experiments (positional, scaling,
          heads, attention_maps, rnn_vs_transformer, residual_norm, hparams); JSON, PNG in DIR
  attention --workdir DIR [--input "3 1 4"] [--output DIR2]: attention heat maps per head
  bench-input  input pipeline examples/s and tokens/s (prepared ids: padded, packed, token
               budget, sampled; --workers 0,1,2) next to SentencePiece in Python and the train
               step's consumption [--accelerator h200|h100|v5e] [--output DIR]; on a generated
               WMT-like corpus when --config is parallel_text without files
  compile --config X --topology v5e:4x4|h100:8 [--num_slices N] [--mode train|decode]
          [--rows_per_chip N] [--search] [--seq_lens 4096,...] [--attention auto,xla]
          [--output DIR]: compile the train step (or decode loop) for a TPU topology or GPU
          host on this machine (libtpu or JAX's CUDA plugin; no TPU or GPU needed): per-chip
          memory, FLOPs, kernels launched, collectives, estimated speed
"""


def _hide_gpus_from_tensorflow() -> None:
    """TensorFlow (TFDS, preparing ids, gs:// files) must leave the GPUs to JAX."""
    try:
        import tensorflow as tf
    except ImportError:  # the model-only commands (bench, check-attention) run without it
        return

    tf.config.set_visible_devices([], "GPU")


def _require(value, flag: str):
    if value is None:
        raise app.UsageError(f"--{flag} is required")
    return value


_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "train: start jax.distributed: auto (when flags, JAX_COORDINATOR_ADDRESS or a SLURM, MPI "
    "or TPU cluster say there are several processes), on, off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "train: host:port of process "
                                   "0 (default: JAX_COORDINATOR_ADDRESS or the cluster's).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "train: processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "train: this process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 300, "train: seconds to wait for all "
                                     "processes to join before failing.")


def train_command() -> None:
    config = _require(_CONFIG.value, "config")
    workdir = _require(_WORKDIR.value, "workdir")
    if config.deterministic:  # read when the backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"
        ).strip()
    from t2t_jax.runtime import distributed

    distributed.initialize(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        _INIT_TIMEOUT.value,
    )
    distributed.log_to_file(os.path.join(workdir, "logs"))
    from t2t_jax.train import train_and_evaluate

    result = train_and_evaluate(config, workdir)
    import jax

    if jax.process_index() != 0:
        return
    print(f"workdir: {os.path.abspath(workdir)}")
    if "preempted_at" in result:
        print(f"preempted: saved step {result['preempted_at']}; run the same command to resume")
        return
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
        if key in result:
            print(f"{key:>15s}: {result[key]:.4f}")
    if "bleu" in result:
        print(f"{'bleu':>15s}: {result['bleu']:.2f} ({result['bleu_signature']})")
    for source, target, output in result.get("samples", []):
        mark = "ok " if output == target else "BAD"
        print(f"[{mark}] {source}\n      -> {output}\n      (target {target})")


def prepare_command() -> None:
    from t2t_jax.data import prepare, tasks

    config = _require(_CONFIG.value, "config")
    workdir = _require(_WORKDIR.value, "workdir")
    builders = {split: tasks.builder_from_config(config.data, split=split, prepare=True)
                for split in ("train", "test")}
    tokenizer = tasks.tokenizer_from_config(config.data, workdir, builders["train"])
    tokenizer.save(workdir)
    dataset = prepare.open_or_prepare(
        config.data, tokenizer, lambda split: builders["test" if split == "test" else "train"])
    for name, info in dataset.manifest["splits"].items():
        tokens = info["tokens"]
        print(f"{name}: {info['examples']:,d} pairs, {tokens['inputs']:,d} + "
              f"{tokens['targets']:,d} tokens")
    print(f"prepared ids: {dataset.directory} (key {dataset.key}; made in "
          f"{dataset.manifest['seconds']:.0f} s)")
    print(f"tokenizer: {tokenizer.vocab_size} ids, saved in {os.path.abspath(workdir)}")


_PAIRS = flags.DEFINE_integer("pairs", 100_000, "bench-input: generated sentence pairs.")
_BATCHES = flags.DEFINE_integer("batches", 300, "bench-input: batches to time per variant.")
_STEPS = flags.DEFINE_integer("steps", 3, "bench, bench-input: steps to time after warm-up "
                              "(bench-input: 0 skips the train step).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "bench-input: input worker counts to "
                             "time (0: a thread of this process).")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "bench-input: also print each variant's "
                                   "share of what one such accelerator consumes "
                                   "(h200, h100, v5e).")


def bench_input_command() -> None:
    from t2t_jax.perf import input_bench

    config = _require(_CONFIG.value, "config")
    workdir = _require(_WORKDIR.value, "workdir")
    if _ACCELERATOR.value:
        input_bench.demand_ratios([], _ACCELERATOR.value)  # an unknown name fails before work
    if config.data.task == "parallel_text" and not config.data.train_source:
        print(f"generating {_PAIRS.value:,d} WMT-like sentence pairs in {workdir}/corpus")
        files = input_bench.synthetic_corpus(os.path.join(workdir, "corpus"), _PAIRS.value)
        config.data.update(files)
    workers = tuple(int(w) for w in _WORKERS.value)
    rows = input_bench.run(config, workdir, _BATCHES.value, _STEPS.value, workers)
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
    if _ACCELERATOR.value:
        print("\n".join(input_bench.demand_ratios(rows, _ACCELERATOR.value)))
    if _OUTPUT.value:
        print(f"wrote {input_bench.write_json(rows, _OUTPUT.value)}")


_STEP = flags.DEFINE_integer("step", None, "decode/evaluate: checkpoint step (default: latest).")
_INPUT = flags.DEFINE_string("input", "-", "decode: file of source lines, or - for stdin.")
_OUTPUT = flags.DEFINE_string("output", None, "decode: output file (default stdout); "
                              "average: the new workdir; bench: folder for json, csv, png; "
                              "compile: folder for compile.json; bench-input: folder for "
                              "bench_input.json.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "decode/evaluate: sentences per batch; "
                                  "compile --mode decode: per host.")
_BEAM_SIZE = flags.DEFINE_list("beam_size", ["4"], "decode/evaluate: beams; 1 is greedy. "
                               "evaluate: a list sweeps (1,4,8). bench --mode decode: greedy "
                               "unless given.")
_ALPHA = flags.DEFINE_list("alpha", ["0.6"], "decode/evaluate: GNMT length penalty exponent; "
                           "evaluate: a list sweeps (0.6,1.0).")
_NBEST = flags.DEFINE_integer("nbest", 1, "decode: the N best hypotheses per input, with scores "
                              "(needs --beam_size N or more).")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "plain", "nbest", "jsonl"],
                            "decode/score output: plain (one line per input), nbest ('index ||| "
                            "hypothesis ||| log_prob ||| score'), jsonl; auto: plain for "
                            "--nbest 1, else nbest. score: tsv (auto) or jsonl.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "decode: >0 samples at this temperature "
                                   "(with --beam_size 1) instead of searching.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "decode, sampling: only the k likeliest tokens.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "decode, sampling: the nucleus probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "decode, sampling: random seed.")
_EXTRA_LENGTH = flags.DEFINE_integer("extra_length", 50, "decode/evaluate: outputs may be this "
                                     "many tokens longer than their input.")
_SPLIT = flags.DEFINE_string("split", "test", "evaluate: the split to decode and score.")
_LAST = flags.DEFINE_integer("last", 5, "average: how many of the newest checkpoints.")
_AVERAGE = flags.DEFINE_integer("average", 1, "decode/evaluate/score: use the mean params of "
                                "each workdir's newest N checkpoints (up to --step), averaged "
                                "in memory; e.g. --workdir RUN/average_pool --average 5.",
                                lower_bound=1)
_SOURCE = flags.DEFINE_string("source", None, "score: file of source lines.")
_TARGET = flags.DEFINE_string("target", None, "score: file of target lines, one per source.")


def _read_lines(path: str, flag: str = "input") -> list[str]:
    if path == "-":
        return [line.rstrip("\r\n") for line in sys.stdin]
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def _numbers(flag, kind: type) -> list:
    try:
        return [kind(v) for v in flag.value]
    except ValueError:
        raise ValueError(f"--{flag.name} takes {kind.__name__}s separated by commas, got "
                         f"{','.join(flag.value)!r}") from None


def _one(flag, kind: type):
    values = _numbers(flag, kind)
    if len(values) != 1:
        raise ValueError(f"--{flag.name} takes one value here (a list sweeps only in evaluate)")
    return values[0]


def _workdirs() -> list[str]:
    """--workdir A[,B,...]: several decode as an ensemble."""
    return [w for w in _require(_WORKDIR.value, "workdir").split(",") if w]


def _decode_options(beam_size: int, alpha: float, nbest: int = 1):
    """decode/evaluate's flags as DecodeOptions; sampling (--temperature) searches no beams."""
    from t2t_jax.decode import DecodeOptions, Search

    sampling = _TEMPERATURE.value > 0
    search = Search(1 if sampling else beam_size, alpha, nbest, _TEMPERATURE.value,
                    _TOP_K.value, _TOP_P.value)
    return DecodeOptions(search, _SEED.value, _BATCH_SIZE.value, _EXTRA_LENGTH.value)


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


def decode_command() -> None:
    from t2t_jax.decode import load_decoder, translate, translate_stream

    # Flags are checked before the (slow) restore: a mistake costs no wait.
    options = _decode_options(_one(_BEAM_SIZE, int), _one(_ALPHA, float), _NBEST.value)
    form = _FORMAT.value if _FORMAT.value != "auto" else ("plain" if _NBEST.value == 1
                                                           else "nbest")
    decoder = load_decoder(_workdirs(), _STEP.value, _AVERAGE.value)
    what = "sampling" if options.search.temperature > 0 else f"beam {options.search.beam_size}"
    if _INPUT.value == "-" and sys.stdin.isatty() and not _OUTPUT.value:
        # A person typing: each line is translated as soon as it is entered.
        print(f"step {decoder.step}, {what}: type a line, Ctrl-D to end", file=sys.stderr)
        index = iter(range(1 << 62))

        def write(hypotheses):
            sys.stdout.write(format_hypotheses(next(index), hypotheses, form))
            sys.stdout.flush()

        translate_stream(decoder, sys.stdin, write, options)
        return
    lines = _read_lines(_INPUT.value)
    results, stats = translate(decoder, lines, options, sys.stderr.isatty())
    text = "".join(format_hypotheses(i, h, form) for i, h in enumerate(results))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(
        f"decoded {len(lines)} lines with step {decoder.step} ({what}"
        f"{f', ensemble of {len(decoder.models)}' if len(decoder.models) > 1 else ''}): "
        f"{stats['sentences_per_s']:.1f} sentences/s, {stats['tokens_per_s']:.1f} tokens/s",
        file=sys.stderr,
    )


def evaluate_command() -> None:
    from t2t_jax import bleu
    from t2t_jax.data import tasks
    from t2t_jax.decode import best_texts, load_decoder, translate

    workdirs = _workdirs()
    decoder = load_decoder(workdirs, _STEP.value, _AVERAGE.value)
    data = decoder.config.data
    builder = tasks.builder_from_config(data, split=_SPLIT.value)
    # In the file's line order: the hypotheses file lines up with the user's test files.
    sources, references = tasks.text_examples(builder, _SPLIT.value, data)
    settings = [(b, a) for b in _numbers(_BEAM_SIZE, int) for a in _numbers(_ALPHA, float)]
    rows = []
    for beam_size, alpha in settings:  # one compilation per setting
        options = _decode_options(beam_size, alpha)
        outputs, stats = translate(decoder, sources, options, sys.stderr.isatty())
        outputs = best_texts(outputs)
        score, signature = bleu.corpus_bleu(outputs, references)
        chrf, chrf_signature = bleu.corpus_chrf(outputs, references)
        exact = sum(o == r for o, r in zip(outputs, references, strict=True))
        suffix = "" if len(settings) == 1 else f"_beam{beam_size}_alpha{alpha:g}"
        path = os.path.join(workdirs[0], f"hypotheses_{_SPLIT.value}_step{decoder.step}"
                            f"{f'_average{_AVERAGE.value}' if _AVERAGE.value > 1 else ''}"
                            f"{'_ensemble' if len(workdirs) > 1 else ''}{suffix}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in outputs))
        rows.append((beam_size, alpha, score, chrf, exact / max(len(sources), 1),
                     stats["sentences_per_s"], stats["tokens_per_s"], path))
    models = f"ensemble of {len(workdirs)}" if len(workdirs) > 1 else "one model"
    if _AVERAGE.value > 1:
        models += (", each" if len(workdirs) > 1 else ",") + (
            f" the average of its newest {_AVERAGE.value} checkpoints")
    print(f"{len(sources)} {_SPLIT.value} sentences, step {decoder.step}, {models}")
    print(f"BLEU: {signature}")
    print(f"chrF: {chrf_signature}")
    print(f"{'beam':>4s} {'alpha':>5s} {'BLEU':>6s} {'chrF':>6s} {'exact':>6s} "
          f"{'sent/s':>8s} {'tok/s':>9s}  hypotheses")
    for beam_size, alpha, score, chrf, exact, sentences, tokens, path in rows:
        print(f"{beam_size:4d} {alpha:5.2f} {score:6.2f} {chrf:6.2f} {exact:6.4f} "
              f"{sentences:8.1f} {tokens:9.1f}  {path}")


def score_command() -> None:
    from t2t_jax.decode import load_decoder
    from t2t_jax.scoring import score_pairs

    sources = _read_lines(_require(_SOURCE.value, "source"), "source")
    targets = _read_lines(_require(_TARGET.value, "target"), "target")
    decoder = load_decoder(_workdirs(), _STEP.value, _AVERAGE.value)
    scores, stats = score_pairs(decoder, sources, targets, _BATCH_SIZE.value)
    if _FORMAT.value == "jsonl":
        text = "".join(json.dumps({"index": i, "log_prob": round(s.log_prob, 6),
                                   "per_token": round(s.per_token, 6), "tokens": s.tokens})
                       + "\n" for i, s in enumerate(scores))
    elif _FORMAT.value in ("auto", "plain"):
        text = "".join(f"{s.log_prob:.6f}\t{s.per_token:.6f}\t{s.tokens}\n" for s in scores)
    else:
        raise ValueError(f"score --format is plain (tab-separated) or jsonl, got {_FORMAT.value}")
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    total = sum(s.log_prob for s in scores)
    tokens = sum(s.tokens for s in scores)
    perplexity = math.exp(-total / tokens) if tokens else float("inf")
    print(f"scored {len(scores)} pairs, {tokens} target tokens with step {decoder.step}: "
          f"log-prob {total:.2f}, perplexity {perplexity:.3f}; {stats['pairs_per_s']:.1f} "
          f"pairs/s", file=sys.stderr)


def average_command() -> None:
    from t2t_jax.checkpoint import average_checkpoints

    workdir = _require(_WORKDIR.value, "workdir")
    output = _require(_OUTPUT.value, "output")
    steps = average_checkpoints(workdir, _LAST.value, output)
    print(f"averaged the params of steps {steps} into {os.path.abspath(output)}")


_SEQ_LENS = flags.DEFINE_list("seq_lens", "128,256,512,1024,2048,4096,8192",
                              "bench: sequence lengths.")
_ATTENTION = flags.DEFINE_list("attention", "xla,dot_product_attention",
                               "bench: attention implementations.")
_MODE = flags.DEFINE_string("mode", "train", "bench: train (step), forward (eval step) or "
                            "decode (greedy, key/value cache); compile: train or decode (the "
                            "beam search loop).")
_BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 8192, "bench: tokens a side per step.")
_PACKED_EXAMPLES = flags.DEFINE_integer(
    "packed_examples", 0, "bench: pack this many equal examples in each row (train and forward "
    "modes; with --config.model.max_segments_per_row cuDNN takes them as spans).", lower_bound=0)
_PROFILE = flags.DEFINE_string("profile", None, "bench: profile each point into this folder (a "
                               "jax.profiler trace per point) and print its device time by kind.")


def _expected_vocab_size(config) -> int:
    from t2t_jax.data import tasks

    return tasks.expected_vocab_size(config)


def bench_command() -> None:
    from t2t_jax.perf import bench, profiling

    config = _require(_CONFIG.value, "config")

    def progress(point: bench.Point) -> None:  # rows as they come, on stderr
        print(bench.format_table([point])[-1], file=sys.stderr, flush=True)

    print(bench.format_table([])[0], file=sys.stderr, flush=True)
    points, peak_source = bench.run_bench(
        config,
        # The data modules (TensorFlow) load only where the config leaves the vocabulary open.
        config.model.vocab_size or _expected_vocab_size(config),
        [int(s) for s in _SEQ_LENS.value],
        _ATTENTION.value,
        _MODE.value,
        _BATCH_TOKENS.value,
        _STEPS.value,
        progress,
        _PROFILE.value,
        _one(_BEAM_SIZE, int) if FLAGS["beam_size"].present else 1,  # else greedy
        _PACKED_EXAMPLES.value,
    )
    print(f"devices: {jax_device_summary()}; peak: {peak_source}")
    print("\n".join(bench.format_table(points)))
    for point in points:
        if point.profile:
            print("\n".join(profiling.format_breakdown(
                profiling.Breakdown(**point.profile),
                f"\n{point.mode} {point.attention} {point.seq_len}: trace in {_PROFILE.value}",
            )))
    if _OUTPUT.value:
        for path in bench.write_outputs(points, _OUTPUT.value, f"{config.model.type}, "
                                        f"d_model {config.model.d_model}, {jax_device_summary()}"):
            print(f"wrote {path}")


_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float16", "float32"], "check-attention: input dtype."
)
_LENGTH = flags.DEFINE_integer("length", 256, "check-attention: query and key length.")


def check_attention_command() -> None:
    from t2t_jax.perf import kernel_check

    implementations = [a for a in _ATTENTION.value if a != "auto"]
    checks = kernel_check.check_kernels(implementations, _DTYPE.value, _LENGTH.value)
    print(f"devices: {jax_device_summary()}; errors relative to the float32 einsum reference")
    print("\n".join(kernel_check.format_checks(checks)))
    if _OUTPUT.value:
        os.makedirs(_OUTPUT.value, exist_ok=True)
        path = os.path.join(_OUTPUT.value, "check_attention.json")
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(c) for c in checks], f, indent=1)
        print(f"wrote {path}")


_TOPOLOGY = flags.DEFINE_string("topology", None, "compile: a TPU topology (v5e:4x4, v5p:4x4x4, "
                                "v4:2x2x1), accelerator type (v5e-16, v5p-128, v4-8), or GPU "
                                "host (h100, h100:8, h200:8, a100:8).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "compile: TPU slices, or GPU hosts, joined "
                                   "over the data-center network.")
_ROWS_PER_CHIP = flags.DEFINE_integer("rows_per_chip", None, "compile: rows per data-parallel "
                                      "shard (the global batch is this x data x fsdp); "
                                      "default: the config's data.batch_size.")
_SEARCH = flags.DEFINE_bool("search", False, "compile: compile candidate meshes and remat "
                            "policies, rank those that fit by estimated tokens/s.")


def compile_command() -> None:
    from t2t_jax.perf import aot_report, aot_search

    config = _require(_CONFIG.value, "config")
    topology = _require(_TOPOLOGY.value, "topology")

    def progress(row) -> None:  # rows as they come, on stderr: compiles take minutes
        print(aot_report.format_table([row])[-1], file=sys.stderr, flush=True)

    print(aot_report.format_table([])[0], file=sys.stderr, flush=True)
    rows = aot_search.run(
        config, topology, config.model.vocab_size or _expected_vocab_size(config),
        num_slices=_NUM_SLICES.value, mode=_MODE.value, rows_per_chip=_ROWS_PER_CHIP.value,
        seq_lens=[int(s) for s in _SEQ_LENS.value] if FLAGS["seq_lens"].present else None,
        attentions=_ATTENTION.value if FLAGS["attention"].present else None,
        find_mesh=_SEARCH.value, decode_rows=_BATCH_SIZE.value, beam_size=_one(_BEAM_SIZE, int),
        alpha=_one(_ALPHA, float), extra_length=_EXTRA_LENGTH.value, on_row=progress,
    )
    print(f"{rows[0].model}; {rows[0].mode} step; estimates are a roofline, not a measurement:"
          f" {rows[0].estimate_method or 'none'}")
    print("\n".join(aot_report.format_table(rows)))
    fitting = [r for r in rows if r.fits and r.estimated_tokens_per_s]
    if _SEARCH.value:
        if fitting:
            print(f"best: {aot_search.mesh_flags(fitting[0])}")
        else:
            print("no candidate fits: use a larger topology, fewer --rows_per_chip, or "
                  "shorter sequences")
    if _OUTPUT.value:
        for path in aot_report.write_outputs(rows, _OUTPUT.value):
            print(f"wrote {path}")


_SMOKE = flags.DEFINE_bool("smoke", False, "experiment: a seconds-long reduced run (tests).")
_TEXT = flags.DEFINE_string("text", "3 1 4 1 5 9 2 6", "attention: the input sentence "
                            "(or give it as --input).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "experiment: TFDS data dir for the tasks.")


def experiment_command() -> None:
    from t2t_jax.guide import experiments

    if len(_ARGS) != 1:
        raise ValueError(f"name one experiment: t2t-jax experiment NAME --output DIR; "
                         f"NAME is one of {', '.join(experiments.EXPERIMENTS)}")
    output = _require(_OUTPUT.value, "output")
    results = experiments.run(_ARGS[0], output, _SMOKE.value, data_dir=_DATA_DIR.value)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1)[:2000])
    for name, run in results.get("runs", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in run.items() if k != "curve")
        print(f"{name:>12s}: {shown}")
    print(f"wrote {_ARGS[0]}.json and its plots in {os.path.abspath(output)}")


def attention_command() -> None:
    from t2t_jax.guide import experiments

    workdir = _require(_WORKDIR.value, "workdir")
    output = _OUTPUT.value or os.path.join(workdir, "attention_maps")
    text = _INPUT.value if _INPUT.value != "-" else _TEXT.value  # --input TEXT or --text TEXT
    results = experiments.attention_maps(output, False, workdir=workdir, text=text)
    print(f"{' '.join(results['source'])} -> {' '.join(results['output'])}")
    print(f"wrote {os.path.join(os.path.abspath(output), 'attention_maps.png')}")


def jax_device_summary() -> str:
    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind} (jax {jax.__version__})"


def info_command() -> None:
    from t2t_jax.perf.info import describe

    print("\n".join(describe(_require(_CONFIG.value, "config"))))


COMMANDS = {
    "train": train_command,
    "prepare": prepare_command,
    "info": info_command,
    "bench-input": bench_input_command,
    "decode": decode_command,
    "evaluate": evaluate_command,
    "average": average_command,
    "score": score_command,
    "bench": bench_command,
    "check-attention": check_attention_command,
    "compile": compile_command,
    "experiment": experiment_command,
    "attention": attention_command,
}


_ARGS: list[str] = []  # positional arguments after the command (experiment NAME)


def main(argv: list[str]) -> None:
    takes_args = len(argv) > 1 and argv[1] == "experiment"
    if len(argv) < 2 or argv[1] not in COMMANDS or (len(argv) > 2 and not takes_args):
        extra = " ".join(argv[1:]) or "nothing"
        raise app.UsageError(f"expected one command, got {extra!r}\n{USAGE}")
    _ARGS[:] = argv[2:]
    _hide_gpus_from_tensorflow()
    logging.set_verbosity(logging.WARNING)
    try:
        COMMANDS[argv[1]]()
    except Exception as error:
        code = _error_code(error)
        if code:  # a mistake in the config or input, or a diverged run: one line, no traceback
            print(f"t2t-jax {argv[1]}: error: {error}", file=sys.stderr)
            _exit(code)
        if not _is_multiprocess():
            raise
        import traceback

        traceback.print_exc()
        _exit(1)


def _error_code(error: Exception) -> int:
    """2 for configuration and input mistakes, 3 for a run that diverged, 0 for a bug."""
    if isinstance(error, (ValueError, FileNotFoundError)):
        return 2
    from t2t_jax.train import TrainingDiverged

    return 3 if isinstance(error, TrainingDiverged) else 0


def _is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def _exit(code: int) -> None:
    """Exits now. In a multi-process run, without JAX's shutdown barrier: the other processes
    will never reach it, and waiting for them would hang this one instead of failing it."""
    if _is_multiprocess():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown key, bad value) as one line."""
    try:
        remaining = FLAGS(argv)
        if _CONFIG.value is not None:
            dict(_CONFIG.value)  # a config file that failed to load raises only when read
        return remaining
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        message = " ".join(lines[-2:]) if isinstance(error, OSError) else lines[-1]
        if isinstance(error, (AttributeError, KeyError)):
            message = _unknown_key_message(argv, message)
        print(f"t2t-jax: error: {message}", file=sys.stderr)
        sys.exit(2)


def _unknown_key_message(argv: list[str], message: str) -> str:
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=")[0]
            from t2t_jax.config import RETIRED_KEYS

            if key in RETIRED_KEYS:
                return f"{key} was retired: {RETIRED_KEYS[key]}"
            if f"'{key.split('.')[-1]}'" in message:
                return (
                    f"unknown config key {key!r} in {arg}; check the spelling against the "
                    "fields of t2t_jax/config.py"
                )
    return message


def run() -> None:
    """Console entry point."""
    host_allocator.restart_with_huge_pages()  # returns where the restart would change nothing
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
