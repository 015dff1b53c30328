"""The default configuration: every knob, with why it is set as it is.

Config files in `configs/` start from `default_config()` and change what their task or model
size needs; the command line changes any field (`--config.model.num_heads=4`).
"""

from __future__ import annotations

import ml_collections

# Keys that no longer exist, and what to do instead: a config that still sets one is an error
# that says so, not a setting silently ignored.
RETIRED_KEYS = {
    "data.input_order": "the input order no longer depends on the number of processes (every "
    "process plans the global batches and reads its own rows of them), so it has no setting: "
    "remove data.input_order from the config",
    "data.shuffle_buffer": "each epoch is shuffled whole, by a permutation of its examples, "
    "with no shuffle buffer: remove data.shuffle_buffer from the config",
}


def check_retired(config: ml_collections.ConfigDict) -> None:
    """A one-line error for the first retired key the config sets."""
    for key, why in RETIRED_KEYS.items():
        parent, leaf = key.rsplit(".", 1)
        if leaf in config.get(parent, {}):
            raise ValueError(f"{key} was retired: {why}")


def default_config() -> ml_collections.ConfigDict:
    """The paper's base model on the built-in reverse task, one process, data parallel."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # XLA's deterministic GPU kernels (--xla_gpu_deterministic_ops; scatter-adds such as the
    # embedding gradient get slower): two runs with one seed give bit-identical checkpoints.
    # CPU and TPU runs are deterministic either way. train_and_evaluate (and the command line,
    # earlier) set it before JAX starts: `train.apply_process_settings`.
    config.deterministic = False

    config.model = ml_collections.ConfigDict()
    # or "decoder_only" (a language model, same blocks), or "lstm_seq2seq" (the recurrent
    # baseline of the paper guide; trains and evaluates, no incremental decoding)
    config.model.type = "encoder_decoder"
    # None: the tokenizer's size. The paper shares a 37000-token vocabulary.
    config.model.vocab_size = ml_collections.config_dict.placeholder(int)
    config.model.num_encoder_layers = 6  # N
    config.model.num_decoder_layers = 6
    config.model.d_model = 512
    config.model.d_ff = 2048
    config.model.num_heads = 8  # h; d_k = d_v = d_model / h
    config.model.dropout_rate = 0.1  # P_drop on sub-layer outputs and embedding sums
    config.model.attention_dropout_rate = 0.0  # not in the paper
    config.model.relu_dropout_rate = 0.0  # not in the paper
    config.model.share_embeddings = True  # source, target and pre-softmax weights tied (3.4)
    # The paper's attention projections W^Q, W^K, W^V, W^O are matrices (3.2.2), as in
    # Tensor2Tensor and Flax's WMT example. True adds a bias to each, as t2t_jax did before
    # 2026-11-27 (checkpoints of that time hold them; decode finds that out by itself).
    config.model.attention_bias = False
    config.model.norm = "post"  # "post" as in the paper, "pre" for pre-LN
    config.model.layer_norm_epsilon = 1e-6
    # "auto": cuDNN's fused flash kernel on GPUs with bf16/fp16, the Pallas splash kernel on
    # TPU, on CPU einsum below 256 keys and the blockwise kernel from there on (both measured
    # fastest there), else the XLA einsum path. Or name one: "xla" (einsum),
    # "dot_product_attention" (jax.nn.dot_product_attention's default), "cudnn" or "splash"
    # (forced; einsum, logged, where they cannot run), "blockwise" (flash attention in plain
    # JAX: memory linear in length on any backend; slower than cuDNN's kernel on GPU).
    config.model.attention = "auto"
    config.model.dtype = "float32"  # compute dtype, "bfloat16" for speed; params stay f32
    # Recompute each layer in the backward pass: "none", "full" or "dots" (keep matmul outputs).
    config.model.remat = "none"
    # True: nn.scan over one layer's code with stacked params, so that compile time does not
    # grow with depth (checkpoints then differ in layout from unrolled ones; decoding unstacks).
    config.model.scan_layers = False
    # Departures from the paper for docs/paper_guide.md's experiments: "learned" positions
    # (max_positions rows) or "none"; scale_attention False drops 1/sqrt(d_k).
    config.model.positional = "sinusoidal"
    config.model.max_positions = 1024
    config.model.scale_attention = True
    config.model.residual = True  # False: no residual connections (the guide's experiment)
    # With data.packing: the most examples a row may hold, 0 for as many as fit. Above 0 the
    # packer keeps to it and cuDNN (9.6+, Hopper and later) takes packed rows as each example's
    # span instead of a dense [q_len, k_len] mask. Keep it near the most examples rows really
    # hold: cuDNN keeps softmax statistics per slot ([rows x N, heads, length] float32 in each
    # attention layer), and too low a cap leaves rows less full.
    config.model.max_segments_per_row = 0

    config.data = ml_collections.ConfigDict()
    config.data.task = "reverse"  # a built-in task: reverse, copy, sort, addition
    # TFDS data dir; None: TFDS's default (~/tensorflow_datasets).
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    # data.task "parallel_text": your files, two aligned ones per split or one TSV (gz allowed).
    for split in ("train", "eval", "test"):
        for part in ("source", "target", "tsv"):
            config.data[f"{split}_{part}"] = ml_collections.config_dict.placeholder(str)
    # Translation datasets (wmt14_translate/de-en, ...): direction, and the test set's dataset
    # when it differs (WMT17 training is tested on WMT14's newstest2014).
    config.data.source_language = "en"
    config.data.target_language = "de"
    config.data.test_task = ml_collections.config_dict.placeholder(str)
    # SentencePiece for text tasks: a given model file, or one trained on the training split.
    config.data.tokenizer_model = ml_collections.config_dict.placeholder(str)
    config.data.spm_vocab_size = 37_000  # the paper's shared source-target vocabulary
    config.data.spm_max_sentences = 10_000_000  # the character budget, in sentences
    config.data.spm_model_type = "unigram"  # or "bpe" (the paper used byte-pair encoding)
    # >0: subword regularization (Kudo 2018): training batches sample a new segmentation of
    # each sentence at every pass from its spm_sampling_nbest best, with this smoothing (0.1-0.2
    # suit unigram models); eval, BLEU and decoding keep the one best. It helps small corpora.
    # Each draw is seeded by the seed and the example's place in the input, so a resumed run
    # draws the segmentations an uninterrupted one would have.
    config.data.spm_sampling_alpha = 0.0
    config.data.spm_sampling_nbest = 64  # Kudo's l
    config.data.algorithmic = ml_collections.ConfigDict()
    config.data.algorithmic.vocab_size = 10  # distinct symbols (the base, for addition)
    config.data.algorithmic.min_length = 1
    config.data.algorithmic.max_length = 20  # train and validation lengths
    config.data.algorithmic.test_max_length = 40  # test split: max_length+1 .. this
    config.data.algorithmic.num_train = 50_000
    config.data.algorithmic.num_validation = 1_000
    config.data.algorithmic.num_test = 1_000
    config.data.algorithmic.seed = 0
    config.data.max_source_length = 21  # tokens, EOS included
    config.data.max_target_length = 21
    config.data.test_max_source_length = 41
    config.data.test_max_target_length = 41
    config.data.overlong = "drop"  # or "truncate"
    config.data.packing = False  # pack several examples per row (segment masks keep them apart)
    config.data.batch_size = 64  # global rows per step, across all processes
    # >0 (with packing off): batches of about this many tokens a side instead, in length
    # buckets, as the paper's ~25,000-token batches; each bucket's row count varies.
    config.data.token_budget = 0
    # Training reads prepared ids (t2t_jax/data/prepare.py: the corpus tokenized once, kept
    # beside the TFDS data or in prepared_dir, a local directory). Batches are gathered ahead of
    # the step by this many worker processes, with the epochs planned in one more; 0: a thread
    # of the training process, which on two CPU cores already delivers several H200s' worth of
    # packed rows (docs/benchmarks.md). 1-2 leave the training process free for the steps of a
    # host with several accelerators; the n-best pass of subword sampling runs on them too.
    config.data.input_workers = 0
    config.data.prepared_dir = ml_collections.config_dict.placeholder(str)
    config.data.prepare_threads = 0  # SentencePiece's threads when preparing; 0: every core
    config.data.eval_batch_size = 128
    config.data.eval_steps = -1  # batches per eval; -1: the whole split

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 100_000
    # >0: train this many passes over the training split instead; the steps are worked out from
    # the split's tokens and the batch at the start of training (logged), and `epoch` is logged
    # next to `step`.
    config.train.num_epochs = 0.0
    config.train.learning_rate = 1.0  # scale of d_model^-0.5 * min(step^-0.5, step*warmup^-1.5)
    config.train.warmup_steps = 4000
    # >0: the learning rate falls linearly to 0 over this fraction of train.num_steps at the end
    # (not in the paper; it lets short runs end on settled weights).
    config.train.cooldown_fraction = 0.0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.98
    config.train.adam_eps = 1e-9
    config.train.label_smoothing = 0.1  # eps_ls
    config.train.z_loss = 0.0  # weight of log(Z)^2, keeps logits from drifting; 0 is the paper
    config.train.grad_clip_norm = 0.0  # 0: no clipping (the paper)
    # The random bit generator behind dropout masks: "threefry" (JAX's default; the same masks
    # on any mesh), "rbg" or "unsafe_rbg" (XLA's RngBitGenerator: far cheaper bits on GPU and
    # TPU; the masks depend on the mesh, so a run resumed on another device layout draws other
    # masks from there on). Every choice is deterministic for a given seed and mesh, and resumes
    # exactly. Initial params always come from threefry.
    config.train.dropout_rng = "threefry"
    # >1: optax.MultiSteps, one update every k batches, averaging the k batches' mean-token
    # gradients (equal weight per batch, not per token). num_steps and the *_every intervals
    # count batches; the warmup counts updates.
    config.train.grad_accum_steps = 1
    # A step whose loss, gradients or update is NaN/Inf never changes the state. "stop": the run
    # stops at the next log or checkpoint with an error, keeping the last good checkpoint;
    # "skip": it goes on, logging how many steps it skipped (nonfinite_steps).
    config.train.on_nonfinite = "stop"
    config.train.mode = "jit"  # "jit" (sharded over the mesh) or "pmap" (data parallel)
    config.train.log_every = 100  # steps between metric fetches; nothing else syncs the host
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 5  # the paper averages the last 5 (base) or 20 (big)
    config.train.async_checkpoints = True
    config.train.num_decode_examples = 5  # validation examples decoded greedily at the end
    # Steps between greedy BLEU on the test split and, where there is one, the validation
    # split (`dev_bleu`, which picks the best checkpoint: WORKDIR/best); 0: never. With BLEU
    # on, the end of training reports `test_bleu` and `test_chrf` by beam search
    # (final_beam_size, final_alpha; 0: not) of the averaged checkpoints (average_last), and
    # the best checkpoint's greedy `best_test_bleu` (t2t_jax/selection.py).
    config.train.bleu_every = 0
    config.train.bleu_examples = 1000  # test and dev examples decoded for BLEU; -1: all
    # The dev metric that picks WORKDIR/best: "dev_bleu" (greedy, every bleu_every steps) or
    # "eval_loss" (the validation loss, label-smoothed as logged, every eval_every steps).
    config.train.select_by = "dev_bleu"
    # >0: stop once this many evaluations of select_by in a row have not beaten the best.
    config.train.early_stop_evals = 0
    # >0: average this many checkpoints, taken at even intervals over the last average_span of
    # the run (WORKDIR/average_pool -> WORKDIR/averaged), for the final test numbers.
    config.train.average_last = 0
    config.train.average_span = 0.1
    config.train.final_beam_size = 4  # the paper's beam search for the final test numbers
    config.train.final_alpha = 0.6
    # JAX persistent compilation cache; None: WORKDIR/jax_cache, "" turns it off.
    config.train.compilation_cache_dir = ml_collections.config_dict.placeholder(str)

    # The device mesh (data, fsdp, tensor): each axis is ici x dcn. `ici` shapes the devices of
    # one granule (a TPU slice, or a GPU/CPU host) and `dcn` the granules, over the slower
    # network: by default data parallel across hosts, the fast links left to fsdp and tensor.
    # -1 takes what the other axes leave; on one host dcn is all 1.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.ici = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.mesh.dcn = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config


def small_task_config(task: str) -> ml_collections.ConfigDict:
    """A small model for a built-in task that trains in minutes on two CPU cores."""
    config = default_config()
    config.data.task = task
    config.model.num_encoder_layers = 2
    config.model.num_decoder_layers = 2
    config.model.d_model = 128
    config.model.d_ff = 512
    config.model.num_heads = 4
    config.model.dropout_rate = 0.0  # generated data never repeats enough to overfit
    config.data.batch_size = 64
    config.train.num_steps = 2000
    config.train.warmup_steps = 500
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    return config


def wmt_config(task: str, big: bool = False) -> ml_collections.ConfigDict:
    """The paper's WMT English-German recipe (sections 5.1-5.3) on a TFDS translation dataset.

    Shared SentencePiece vocabulary of 37000 pieces; about 25,000 source and 25,000 target
    tokens per step as 96 packed rows of 256 tokens; warmup 4000; base: 100k steps, the last 5
    checkpoints kept for averaging; big: d_model 1024, d_ff 4096, 16 heads, P_drop 0.3, 300k
    steps, the last 20 kept. Tested on newstest2014.
    """
    config = default_config()
    config.data.task = task
    config.data.test_task = "wmt14_translate/de-en"  # newstest2014, the paper's test set
    config.data.source_language = "en"  # swap with target_language for de->en
    config.data.target_language = "de"
    config.model.vocab_size = 37_000
    config.data.spm_vocab_size = 37_000
    config.data.spm_max_sentences = 4_000_000
    for prefix in ("", "test_"):
        config.data[f"{prefix}max_source_length"] = 256
        config.data[f"{prefix}max_target_length"] = 256
    config.data.packing = True
    config.data.batch_size = 96  # x 256 tokens = 24,576 tokens a side
    config.data.eval_batch_size = 64
    config.train.num_steps = 100_000
    config.train.warmup_steps = 4000
    config.train.checkpoint_every = 2000
    config.train.eval_every = 2000
    config.train.keep_checkpoints = 5
    config.train.bleu_every = 10_000
    config.train.bleu_examples = -1
    return make_big(config) if big else config


def make_big(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's big model (Table 3): d_model 1024, d_ff 4096, 16 heads, P_drop 0.3, trained
    300k steps with the last 20 checkpoints kept for averaging."""
    config.model.d_model = 1024
    config.model.d_ff = 4096
    config.model.num_heads = 16
    config.model.dropout_rate = 0.3
    config.train.num_steps = 300_000
    config.train.keep_checkpoints = 20
    return config


def tiny_config() -> ml_collections.ConfigDict:
    """A smoke-test size: a 1+1-layer d_model 32 model on short reversal, compiling and running
    a step in well under a second on a CPU; for checking a setup (launch scripts, many
    processes), and the tests' base config."""
    config = default_config()
    algorithmic = config.data.algorithmic
    algorithmic.max_length, algorithmic.test_max_length = 6, 9
    algorithmic.num_train, algorithmic.num_validation, algorithmic.num_test = 256, 32, 32
    config.data.max_source_length = config.data.max_target_length = 8
    config.data.test_max_source_length = config.data.test_max_target_length = 10
    config.data.batch_size = config.data.eval_batch_size = 16
    config.model.num_encoder_layers = config.model.num_decoder_layers = 1
    config.model.d_model, config.model.d_ff, config.model.num_heads = 32, 64, 4
    config.model.dropout_rate = 0.0
    config.train.num_steps, config.train.warmup_steps = 4, 10
    config.train.log_every, config.train.eval_every, config.train.checkpoint_every = 2, 4, 2
    config.train.num_decode_examples = 2
    return config
