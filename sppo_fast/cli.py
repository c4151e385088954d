"""`sppo-fast` command line: `train` (config dataclass <- preset <- YAML <- flags) and `plot RUN_DIR`.

Every field of `train.Args` is a flag (`--batch-size 32`, `--no-liger`), documented by the field's docstring.
Precedence, lowest first: Args defaults, the embedded model's demo preset (only when --model is not given),
the --config YAML file, then command-line flags.
"""
import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path

import yaml

PRESETS = Path(__file__).parent / "presets"


def field_docs(cls) -> dict:
    """The string literal under each dataclass field (the docstring-per-field convention of cleanrl's Args)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f"{docs.get(f.name, '')} (default: {default!r})"
        kind = type(default)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=helptext,
                                default=argparse.SUPPRESS)
        elif kind is list:
            parser.add_argument(flag, dest=f.name, nargs="*", help=helptext, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, help=helptext, default=argparse.SUPPRESS)


def load_yaml(path, cls) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; see `sppo-fast train --help`")
    return values


def _resumed_config(resume, cls) -> dict:
    """The config.yaml of the run being resumed (RUN_DIR or RUN_DIR/checkpoints/step_N), minus run bookkeeping."""
    from sppo_fast.checkpoint import STEP_DIR

    path = Path(resume)
    run_dir = path.parent.parent if STEP_DIR.match(path.name) else path
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    saved = yaml.safe_load(config.read_text()) or {}
    names = {f.name for f in dataclasses.fields(cls)} - {"resume", "run_name", "out_dir"}
    return {k: v for k, v in saved.items() if k in names}


def build_args(argv=None):
    """Parse `train` flags into a train.Args, applying preset, YAML and flags in that order."""
    from sppo_fast.train import Args

    parser = argparse.ArgumentParser(prog="sppo-fast train", description="Train a causal LM with SPPO (or GRPO).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    add_dataclass_flags(parser, Args)
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config")
    from_yaml = load_yaml(config_path, Args) if config_path else {}
    values = {**from_yaml, **ns}
    resume = values.get("resume")
    if resume:  # a resumed run keeps its own config; flags given now (e.g. a larger --steps) still win
        saved = _resumed_config(resume, Args)
        values = {**saved, **values}
    if not values.get("model"):  # the embedded tiny model comes with its own demo hyperparameters
        values = {**load_yaml(PRESETS / "tiny.yaml", Args), **values}
    return Args(**values)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sppo-fast {train,plot} ...\n\n  train  train a causal LM with SPPO (or GRPO); "
              "`sppo-fast train` alone runs the CPU demo\n  plot   draw RUN_DIR/metrics.jsonl into a PNG")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from sppo_fast.train import main as train_main
        result = train_main(build_args(rest))
        return 130 if result.get("interrupted") else 0
    if command == "plot":
        parser = argparse.ArgumentParser(prog="sppo-fast plot")
        parser.add_argument("run_dir")
        parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
        parser.add_argument("--keys", nargs="*", default=None, help="metrics to draw (default: all)")
        ns = parser.parse_args(rest)
        from sppo_fast.metrics import plot
        print(plot(ns.run_dir, ns.out, ns.keys))
        return 0
    print(f"sppo-fast: unknown command {command!r} (expected train or plot)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
