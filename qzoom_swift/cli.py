"""The ``qzoom`` command: one subcommand per pipeline step.

Every subcommand is a pair of functions, one declaring its options and one doing the work, registered in
``COMMANDS``. The pipeline steps keep theirs in their own packages (``labels/commands.py``,
``eval/command.py``, ``onnx/commands.py``, ``bench/demo.py``); those modules import only the standard
library at module level and load torch, transformers and swift inside the run functions, so
``qzoom --help`` and ``qzoom plugin-path`` answer in well under a second. No module imports this one.

Adding a subcommand: write the two functions and add one ``Command`` entry to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Each command module imports only the standard library at module level (``qzoom --help`` stays fast).
from qzoom_swift import recipes_command as _recipes
from qzoom_swift.bench import demo as _demo_command
from qzoom_swift.eval import command as _eval
from qzoom_swift.extras import MissingExtraError
from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.fileio import quiet_transformers
from qzoom_swift.labels import commands as _labels
from qzoom_swift.llamafactory_plugin import data_command as _lf_data
from qzoom_swift.llamafactory_plugin import folder as _lf_folder
from qzoom_swift.onnx import commands as _onnx

PACKAGE_DIR = Path(__file__).resolve().parent
SIZES = ("tiny", "bench")


def plugin_path() -> Path:
    """Absolute path of the file that ``swift ... --external_plugins`` must point at."""
    return PACKAGE_DIR / "swift_plugin" / "plugin.py"


# --------------------------------------------------------------------------------------------- plugin-path


def _plugin_path(args: argparse.Namespace) -> int:
    path = plugin_path()
    if not path.is_file():
        print(f"qzoom: warning: {path} does not exist yet (swift_plugin is not built)", file=sys.stderr)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------- build-tiny


def _build_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=(*FAMILY_NAMES, "all"), default="all",
                   help="model family to build (default: all three)")
    p.add_argument("--size", choices=SIZES, default="tiny",
                   help="tiny: width 128, 8 layers, for tests; bench: width 512, 12 layers, for CPU benchmarks "
                        "(default: tiny)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where model dirs go (default: $QZOOM_CACHE, else ~/.cache/qzoom_swift); "
                        "dirs land in <cache-dir>/models/")
    p.add_argument("--seed", type=int, default=0, help="weight init seed; same seed gives identical weights")
    p.add_argument("--force", action="store_true", help="rebuild even if the dir already exists")


def _build_tiny(args: argparse.Namespace) -> int:
    quiet_transformers()
    from qzoom_swift.synthetic.models import build_model_dir

    families = FAMILY_NAMES if args.family == "all" else (args.family,)
    for family in families:
        out = build_model_dir(family, args.size, cache_dir=args.cache_dir, seed=args.seed, force=args.force)
        print(out)
    return 0


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Command:
    help: str  # one line, shown in `qzoom --help`
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None  # shown in `qzoom <command> --help`; defaults to help
    data_parallel: bool = False
    """Splits its records over processes: NPROC_PER_NODE=N starts it under torchrun, as `swift sft` does."""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="run the main job on CPU: Q-Zoom end to end on the zoom bench with a toy VLM trained here",
        description="The zoom bench (synthetic fine-detail VQA with ground-truth boxes) and a toy Qwen2.5-VL trained "
                    "on it (vision warm-up + swift sft), then stage 1 (pseudo labels from the toy's attention, RPN "
                    "swift sft), stage 3 (gate labels along a resolution trajectory, gate swift sft, calibration) "
                    "and the evaluation of the base model at 16/64/256 visual tokens against Q-Zoom (gated, and "
                    "always zooming) at 16: accuracy, throughput, visual tokens, box and gate quality against the "
                    "ground truth. Each stage is timed and cached under --out (a rerun skips finished stages, an "
                    "interrupted one resumes; --force redoes them); writes <out>/report.md, summary.json, "
                    "pareto.png, overlays.png and gate_calibration.png. About 25-30 min on 2 cores the first time "
                    "(the toy model is cached in $QZOOM_CACHE/toy); --preset hires runs the same at 1120 px (100 "
                    "against 1,600 visual tokens) on the full preset's toy; --preset quick runs every stage in "
                    "minutes.",
        add_arguments=_demo_command.add_arguments,
        run=_demo_command.run,
    ),
    "build-tiny": Command(
        help="build local tiny/bench model dirs (config, random weights, tokenizer, processor)",
        description="Build offline Hugging Face model dirs that load like downloaded checkpoints, with "
                    "`AutoModelForImageTextToText.from_pretrained(DIR)` and `swift infer --model DIR`. "
                    "Deterministic per seed; cached, so a second call returns at once. Prints one dir per line.",
        add_arguments=_build_tiny_args,
        run=_build_tiny,
    ),
    "plugin-path": Command(
        help="print the path to pass to swift's --external_plugins",
        description="Print the absolute path of qzoom_swift/swift_plugin/plugin.py, e.g. "
                    "`swift infer --external_plugins $(qzoom plugin-path) --model_type qzoom_qwen2_5_vl ...`.",
        run=_plugin_path,
    ),
    # The labelling jobs (qzoom_swift/labels/commands.py).
    "pseudo-labels": Command(
        help="stage 1: self-distilled tri-state RPN labels from the model's own attention (resumable shards)",
        description=_labels.PSEUDO_LABELS_DESCRIPTION,
        add_arguments=_labels.pseudo_labels_args,
        run=_labels.pseudo_labels_run,
        data_parallel=True,
    ),
    "gate-labels": Command(
        help="stage 3: answers across a resolution trajectory -> consistency-filtered gate labels (resumable)",
        description=_labels.GATE_LABELS_DESCRIPTION,
        add_arguments=_labels.gate_labels_args,
        run=_labels.gate_labels_run,
        data_parallel=True,
    ),
    "calibrate-gate": Command(
        help="choose tau_gate on held-out trajectories and write it into a checkpoint's qzoom_config.json",
        description=_labels.CALIBRATE_GATE_DESCRIPTION,
        add_arguments=_labels.calibrate_gate_args,
        run=_labels.calibrate_gate_run,
    ),
    "mine-hard": Command(
        help="stage 2: judge low-res vs RoI answers and keep the regressions as Post-SFT data (resumable)",
        description=_labels.MINE_HARD_DESCRIPTION,
        add_arguments=_labels.mine_hard_args,
        run=_labels.mine_hard_run,
        data_parallel=True,
    ),
    "merge-shards": Command(
        help="merge a labelling job run as several processes (torchrun / --num-shards) into one summary",
        description=_labels.MERGE_SHARDS_DESCRIPTION,
        add_arguments=_labels.merge_shards_args,
        run=_labels.merge_shards_run,
    ),
    "visualize": Command(
        help="PNG of a pseudo-label record: image, attention, label, predicted heatmap and box",
        description=_labels.VISUALIZE_DESCRIPTION,
        add_arguments=_labels.visualize_args,
        run=_labels.visualize_run,
    ),
    # Evaluation (qzoom_swift/eval/command.py; evalscope runs in worker processes).
    "eval": Command(
        help="benchmarks x runs (baseline/zoom at token budgets) through evalscope: summary table + Pareto plot",
        add_arguments=_eval.add_arguments,
        run=_eval.run,
    ),
    # ONNX export of the branches (qzoom_swift/onnx/commands.py).
    "export-onnx": Command(
        help=_onnx.EXPORT_ONNX_HELP,
        description=_onnx.EXPORT_ONNX_DESCRIPTION,
        add_arguments=_onnx.export_onnx_args,
        run=_onnx.export_onnx_run,
    ),
    # LLaMA-Factory: a labelling job's output as its dataset (qzoom_swift/llamafactory_plugin/data_command.py).
    "lf-dataset": Command(
        help=_lf_data.LF_DATASET_HELP,
        description=_lf_data.LF_DATASET_DESCRIPTION,
        add_arguments=_lf_data.lf_dataset_args,
        run=_lf_data.lf_dataset_run,
    ),
    # LLaMA-Factory model folders and branch conversion (qzoom_swift/llamafactory_plugin/folder.py).
    "lf-model": Command(
        help=_lf_folder.LF_MODEL_HELP,
        description=_lf_folder.LF_MODEL_DESCRIPTION,
        add_arguments=_lf_folder.lf_model_args,
        run=_lf_folder.lf_model_run,
    ),
    "lf-branches": Command(
        help=_lf_folder.LF_BRANCHES_HELP,
        description=_lf_folder.LF_BRANCHES_DESCRIPTION,
        add_arguments=_lf_folder.lf_branches_args,
        run=_lf_folder.lf_branches_run,
    ),
    # The shipped swift sft recipes (qzoom_swift/recipes_command.py; the files are in qzoom_swift/recipes/).
    "recipes": Command(
        help=_recipes.HELP,
        description=_recipes.DESCRIPTION,
        add_arguments=_recipes.add_arguments,
        run=_recipes.run,
    ),
}


EXIT_CODES = "exit codes: 0 done; 1 the job failed (the error says why); 2 usage error (a flag or value is wrong)"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _accept_snake_case(parser: argparse.ArgumentParser) -> None:
    """Let every ``--kebab-case`` option also answer to ``--snake_case``, the spelling ms-swift users type.

    The alias is registered for parsing only, so ``--help`` stays one name per option.
    """
    for action in parser._actions:
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("-", "_") if option.startswith("--") else option
            if alias != option and alias not in parser._option_string_actions:
                parser._option_string_actions[alias] = action


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="how much the library logs to stderr (default: info)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qzoom",
        description="Q-Zoom for vision-language models, as an ms-swift plugin: a gate and a self-distilled "
                    "region proposal head on a middle decoder layer decide when and where to zoom.",
        epilog="Run `qzoom <command> --help` for a command's options. Every --kebab-case flag also accepts its "
               f"--snake_case spelling (--max-new-tokens = --max_new_tokens). {EXIT_CODES}.",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("qzoom_swift")
    except PackageNotFoundError:  # running from a source tree that was not pip-installed
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {ver}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    common = _common_options()
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help, parents=[common],
                           epilog=EXIT_CODES)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
        _accept_snake_case(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _configure_logging(level: str) -> None:
    """One logging set-up for every command: the library's log lines reach stderr at ``--log-level``.

    Other libraries stay at warnings (their info chatter would drown ours) unless ``debug`` is asked for.
    """
    import logging

    logging.basicConfig(level="DEBUG" if level == "debug" else "WARNING", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qzoom_swift").setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 done, 1 job failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args.log_level)
    from qzoom_swift.config import warn_unknown_env

    warn_unknown_env()  # a mistyped QZOOM_* name is said once, before any work
    if COMMANDS[args.command].data_parallel:
        from qzoom_swift.config import read_launch_rank, read_nproc_per_node

        try:
            nproc, launched = read_nproc_per_node(), read_launch_rank()
        except ValueError as exc:
            print(f"qzoom {args.command}: error: {exc}", file=sys.stderr)
            return 2
        if nproc > 1 and launched is None:
            from qzoom_swift.procs import run_under_torchrun

            return run_under_torchrun(nproc, sys.argv[1:] if argv is None else list(argv))
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and not Path(checkpoint).exists():
        from qzoom_swift.hub import CheckpointNotFoundError, looks_like_hub_id, resolve_checkpoint

        if looks_like_hub_id(str(checkpoint)):  # a hub id becomes its downloaded folder, once, for every command
            try:
                args.checkpoint = str(resolve_checkpoint(checkpoint))
            except (CheckpointNotFoundError, MissingExtraError) as exc:
                print(f"qzoom {args.command}: {exc}", file=sys.stderr)
                return 1
    try:
        return int(args._run(args) or 0)
    except MissingExtraError as exc:  # a trainer or extra this environment lacks: say which one to install
        print(f"qzoom {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
