"""`bmt-fast` command line: a registry of subcommands.

    bmt-fast source   --config run.yaml [section.key=value ...] [--resume | --overwrite]
    bmt-fast target   --config run.yaml ...
    bmt-fast transfer --config run.yaml ...
    bmt-fast eval     --config run.yaml [--prompt FILE_OR_PEFT_DIR] [--split validation]
    bmt-fast plot     RUN_DIR [--out DIR]

`source`, `target`, `transfer` and `eval` take `--deepspeed ds_config.json` when launched by `deepspeed` or
`torchrun` (see bmt_fast.transfer.deepspeed_support).

Other modules add subcommands with `register_command` (imported before `main` parses).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from . import info as _info


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: `run(args) -> exit code` becomes `bmt-fast <name>`."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"bmt-fast command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, add_arguments or (lambda parser: None), run)
        return run

    return decorate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmt-fast", description="Bayesian multi-task prompt transfer")
    # The `deepspeed` launcher passes --local_rank before the command; the rank is read from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None, *, close_group: bool = True) -> int:
    """Runs one command; its exit code. close_group: a command run by several processes (--deepspeed) that
    succeeds ends with a barrier and the process group destroyed, as torch asks of a normal exit; False
    keeps the group for more runs in this process (DeepSpeed caches its groups, which a new process group
    would not replace)."""
    reported, diverged = _trainer_errors()
    parser = build_parser()
    # Overrides may come before or after options: argparse collects a positional list only once.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    args.close_group = close_group
    logging.basicConfig(level=logging.INFO, format="bmt-fast: %(message)s")
    try:
        return args.handler(args)
    except reported as error:
        print(f"bmt-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:  # (not about a path the command was given or writes: a traceback)
            raise
        # a path that cannot be read or written (permissions, a folder for a file, a read-only file system):
        # one line, as for a missing one (a traceback before)
        print(f"bmt-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except diverged as error:  # (every process raises it: the update directions are the same everywhere)
        print(f"bmt-fast {args.command}: training diverged: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        if not _is_trainer_package(error):
            raise
        print(f"bmt-fast {args.command}: error: {error}: this command needs the trainer's packages "
              "(pip install 'bmt_fast[train]', or -r requirements/train.txt in a checkout)", file=sys.stderr)
        return 2


# Import names of the packages the trainer, the demo and the plots need beyond bmt_fast's own (torch, numpy):
# pyproject's `train` extra. A command that misses one says which and how to install them.
TRAINER_PACKAGES = frozenset(
    {"yaml", "transformers", "tokenizers", "datasets", "peft", "accelerate", "safetensors", "sentencepiece", "gguf",
     "tqdm", "matplotlib"}
)  # fmt: skip


def _is_trainer_package(error: ModuleNotFoundError) -> bool:
    return (error.name or "").split(".")[0] in TRAINER_PACKAGES


def _trainer_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors a command reports in one line, the trainer's Diverged): the trainer's own only where its
    packages are installed, so that `bmt-fast --help` and `bmt-fast bench` work without them."""
    try:
        from .transfer.checkpoint import CheckpointError
        from .transfer.config import ConfigError
        from .transfer.data import DataError
        from .transfer.loop import Diverged
        from .transfer.metrics_log import RunFileError
    except ModuleNotFoundError as error:
        if not _is_trainer_package(error):
            raise
        return (FileNotFoundError,), ()
    return (ConfigError, CheckpointError, DataError, RunFileError, FileNotFoundError), (Diverged,)


# ---------------------------------------------------------------------------------------------------
# Benchmarks (the benchmarks/ folder of a source checkout; see bmt_fast.bench)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    # (optional here: without one the benchmarks' usage names the ops, where argparse had said "required: op,
    # options")
    parser.add_argument("op", nargs="?", help="svgd_step, svgd_step_vmap, rbf_kernel, rbf_kernel_grad, median_bandwidth, "
                        "kde_prior, prompt_transfer_step, or plot")  # fmt: skip
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options (bmt-fast bench OP --help)")


@register_command("bench", "run a kernel or end-to-end benchmark from a source checkout", _bench_arguments)
def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args.op, args.options)


# ---------------------------------------------------------------------------------------------------
# The trainer's commands


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. source.steps=200 model.dtype=bfloat16")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished stages (and finished ones given more steps) from their last checkpoint; "
        "the configuration may change only in keys that do not change the result (see README)",
    )
    group.add_argument("--overwrite", action="store_true", help="delete this command's stage folders first")
    _deepspeed_argument(parser)


def _deepspeed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--deepspeed",
        metavar="DS_CONFIG",
        help="DeepSpeed config (JSON): the frozen backbone under ZeRO (stage 3 partitions it from load time), "
        "data-parallel prompt training over the processes of `deepspeed` / `torchrun`",
    )


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--prompt", help="evaluate this prompt.safetensors or PEFT adapter folder instead")
    parser.add_argument("--split", help="split to evaluate (default: data.eval_split)")
    _deepspeed_argument(parser)


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (output_dir of a run)")
    parser.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")


def _finish(run, args: argparse.Namespace) -> None:
    """After a command that succeeded (see main's close_group); nothing after an error: other processes may
    be gone, and the barrier would wait for them."""
    if args.close_group:
        run.world.close()


def _open_run(args: argparse.Namespace, command: str):
    from .transfer.config import load_config
    from .transfer.runner import Run

    cfg = load_config(args.config, args.overrides)
    flags = {"resume": getattr(args, "resume", False), "overwrite": getattr(args, "overwrite", False)}
    if command == "eval":  # (a prompt file given: no source stage read, no data.source_tasks needed)
        flags["prompt_path"] = args.prompt
    else:  # (config.yaml, written into output_dir, may be this file: it is not rewritten)
        flags["config_file"] = args.config
    if args.deepspeed:
        from .transfer.deepspeed_support import DeepSpeedRun

        run = DeepSpeedRun(cfg, command, args.deepspeed, **flags)
    else:
        run = Run(cfg, command, **flags)
    if command != "eval":
        run.write_config()
    return run


@register_command("source", "train source prompts (source.method: bmtpt | spot | multitask)", _run_arguments)
def _source(args: argparse.Namespace) -> int:
    run = _open_run(args, "source")
    particles = run.source(run.cfg.source.method)
    run.rewrite_results()
    if run.world.is_main:
        method = run.cfg.source.method
        print(f"source {method}: particles {tuple(particles.shape)} in {run.source_dir(method)}")
    _finish(run, args)
    return 0


@register_command("target", "adapt target prompts from finished source stages (target.methods)", _run_arguments)
def _target(args: argparse.Namespace) -> int:
    return _targets(_open_run(args, "target"), args)


@register_command("transfer", "source stages then target adaptation for every method in target.methods", _run_arguments)
def _transfer(args: argparse.Namespace) -> int:
    from .transfer.config import source_methods_for

    run = _open_run(args, "transfer")
    for method in source_methods_for(run.cfg, "transfer"):
        run.source(method)
    return _targets(run, args)


def _targets(run, args: argparse.Namespace) -> int:
    from .transfer.runner import results_table, write_results

    # The table: these methods, then the other target methods the run folder holds finished (same config).
    results = run.with_other_methods({m: run.target(m) for m in run.cfg.target.methods})
    if run.world.is_main:
        write_results(run.dir, results)
        print(results_table(results), end="")
    _finish(run, args)
    return 0


@register_command("eval", "evaluate the target prompts of a run (or one prompt file)", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    from .transfer.runner import results_table

    run = _open_run(args, "eval")
    results = run.evaluate(args.prompt, args.split)
    if run.world.is_main:
        print(results_table(results), end="")
    _finish(run, args)
    return 0


@register_command("plot", "turn a run folder into PNG plots", _plot_arguments)
def _plot(args: argparse.Namespace) -> int:
    from .transfer.plot import plot_run

    try:
        written = plot_run(args.run_dir, args.out)
    except NotADirectoryError as error:  # (--out names a file)
        print(f"bmt-fast plot: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if not written:
        print(f"no plots: {args.run_dir} holds no metrics or evaluations yet", file=sys.stderr)
    return 0


@register_command("info", _info.DESCRIPTION, _info.add_arguments)
def info_command(args: argparse.Namespace) -> int:
    return _info.main(["--json"] if args.json else [])


# Commands defined elsewhere (they import register_command from this module, which is complete by now).
from .demos import prompt_transfer as _prompt_transfer_demo  # noqa: E402,F401  (bmt-fast demo)

if __name__ == "__main__":
    # `python -m bmt_fast.cli`: this file runs as __main__, but other modules registered their commands in
    # the imported bmt_fast.cli, so parse with that module's registry.
    from bmt_fast import cli

    sys.exit(cli.main())
