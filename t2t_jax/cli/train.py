"""`t2t-jax train` and `t2t-jax prepare`."""

from __future__ import annotations

import argparse
import os

from t2t_jax.cli.args import add_config, add_workdir


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train (or resume) a model in --workdir on --config",
        description="Train on --config in --workdir, or resume the run there from its latest "
                    "checkpoint. Several processes (hosts) start JAX's distributed runtime "
                    "first: see launch/.")
    add_config(train)
    add_workdir(train, "checkpoints, metrics, logs and the tokenizer of the run")
    group = train.add_argument_group("several processes")
    group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                       help="start jax.distributed: auto when flags, JAX_COORDINATOR_ADDRESS "
                            "or a SLURM, MPI or TPU cluster say there are several processes")
    group.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="process 0's address (default: JAX_COORDINATOR_ADDRESS or the "
                            "cluster's)")
    group.add_argument("--num_processes", type=int, help="processes in the run")
    group.add_argument("--process_id", type=int, help="this process's index")
    group.add_argument("--init_timeout", type=int, default=300, metavar="SECONDS",
                       help="how long to wait for every process to join")
    train.set_defaults(run=train_command)

    prepare = commands.add_parser(
        "prepare", help="make --config's datasets, tokenizer and prepared ids (train does "
                        "this on first use)",
        description="Download or generate --config's datasets, train its tokenizer into "
                    "--workdir, and tokenize the data once into prepared ids beside it.")
    add_config(prepare)
    add_workdir(prepare, "where the tokenizer is saved (a later train in it reuses it)")
    prepare.set_defaults(run=prepare_command)


def train_command(args: argparse.Namespace) -> None:
    from t2t_jax import train
    from t2t_jax.runtime import distributed

    train.apply_process_settings(args.config)  # before the distributed runtime starts JAX
    distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                           args.process_id, args.init_timeout)
    distributed.log_to_file(os.path.join(args.workdir, "logs"))
    result = train.train_and_evaluate(args.config, args.workdir)
    import jax

    if jax.process_index() == 0:
        print_result(result, args.workdir)


def print_result(result: dict, workdir: str) -> None:
    """The final metrics, BLEU and decoded samples of a run."""
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


def prepare_command(args: argparse.Namespace) -> None:
    from t2t_jax.data import prepare, tasks

    config, workdir = args.config, args.workdir
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
