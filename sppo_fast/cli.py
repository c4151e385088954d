"""`sppo-fast` command line: `train` (one typed config from preset, YAML and flags), `plot RUN_DIR` and
`export CHECKPOINT_OR_RUN --out DIR` (sppo_fast/export.py).

Every field of `config.Args` is a flag (`--batch-size 32`, `--no-liger`), documented by the field's docstring and
grouped by the section comments of `Args`. Precedence, lowest first: Args defaults, a preset (`--preset NAME`; the
embedded model's demo preset `tiny` when neither --model nor --preset is given), the config.yaml of a run being
resumed, the --config YAML file, then command-line flags. Values from YAML are checked against the field's type the
same way flags are (YAML 1.1 reads `1e-5` as a string: it is accepted as the float it means; a string given for a
list option is one item, never split into characters), then `config.check_args` checks every range, before anything
loads.

Mistakes in the options, data, model path or reward are one line on stderr and exit status 2 (`--debug`, or
SPPO_FAST_DEBUG=1, shows the traceback); anything else is a bug and keeps its traceback.
"""
import argparse
import ast
import dataclasses
import inspect
import logging
import math
import os
import re
import signal
import sys
from pathlib import Path

import yaml

PRESETS = Path(__file__).parent / "presets"
DEMO_PRESET = "tiny"


def quiet_third_party() -> None:
    """Silence import-time noise that says nothing about the run: torchao's "Failed to load ... .so" (optional
    CUDA extensions built for other torch versions; the optimizers we use are pure Python), torch's deprecation
    notices from torchao's pytree registrations, and transformers' progress bars for reading local files."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported


# ---------------------------------------------------------------------------------------------------------------------
# Flags from the Args dataclass
def field_docs(cls) -> dict:
    """The string literal under each dataclass field (the docstring-per-field convention of cleanrl's Args)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def field_sections(cls) -> dict:
    """{field: section title} from the `# --- title` comments between the fields of `cls`."""
    sections, current = {}, "options"
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s*# --- (.+)", line):
            current = m.group(1).strip()
        elif m := re.match(r"\s{4}(\w+):", line):
            sections[m.group(1)] = current
    return sections


_METAVARS = {int: "N", float: "X", str: "STR"}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, demo: dict | None = None) -> None:
    docs, sections, groups = field_docs(cls), field_sections(cls), {}
    for f in dataclasses.fields(cls):
        section = sections.get(f.name, "options")
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f"{docs.get(f.name, '')} (default: {default!r}"
        if demo and f.name in demo and demo[f.name] != default:
            helptext += f"; demo: {demo[f.name]!r}"
        helptext = (helptext + ")").replace("%", "%%")  # argparse formats help strings with %
        if f.type is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=helptext,
                               default=argparse.SUPPRESS)
        elif f.type is list:
            group.add_argument(flag, dest=f.name, nargs="*", metavar="STR", help=helptext, default=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=f.name, type=f.type, metavar=_METAVARS.get(f.type), help=helptext,
                               default=argparse.SUPPRESS)


def attach_negative_numbers(argv: list, cls) -> list:
    """`--lr -1e-5` as `--lr=-1e-5` for every numeric flag of `cls`. argparse takes a value that starts with '-' for
    an option unless it matches its private negative-number pattern, which differs between Python versions (3.11's
    `^-\\d+$|^-\\d*\\.\\d+$` misses `-1e-5`, `-1.` and `-inf`): the `=` form is read the same way everywhere, so a
    negative value gets the option's own range message instead of "expected one argument"."""
    numeric = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.type in (int, float)}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in numeric and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        if arg == "--":  # everything after it is positional
            return out + argv[i:]
        out.append(arg)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# YAML: presets, --config, a resumed run's config.yaml; each value typed like its flag
def coerce(name: str, value, kind, where: str):
    """`value` (from YAML) as the Args field type `kind`, or a ConfigError naming the file, the key and the flag."""
    from sppo_fast.config import ConfigError

    def bad():
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                list: "a list of strings"}[kind]
        return ConfigError(f"{where}: {name} (--{name.replace('_', '-')}) must be {what}, got {value!r}")

    if kind is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-5 as a string: a number needs 1.0e-5 there
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        return float(value)
    if kind is int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind is list:
        if isinstance(value, str):  # one item: `stop_strings: ",;"` is the stop string ",;", not "," and ";"
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        return list(value)
    if value is None:  # `critic:` with nothing after it
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # `run_name: 7`, `memory_budget: 20`
        return str(value)
    if not isinstance(value, str):
        raise bad()
    return value


def load_yaml(path, cls, where: str | None = None) -> dict:
    """The options in a YAML mapping, typed as `cls`'s fields; unknown keys and wrong types are ConfigErrors."""
    from sppo_fast.config import ConfigError

    path, where = Path(path), where or str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value, got {type(values).__name__}")
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; see `sppo-fast train --help`")
    return {k: coerce(k, v, kinds[k], where) for k, v in values.items()}


def preset_names() -> list:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str, cls) -> dict:
    from sppo_fast.config import ConfigError

    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--preset {name!r}: no such preset; available: {', '.join(preset_names())}")
    return load_yaml(path, cls, where=f"preset {name} ({path})")


def _resumed_config(resume, cls) -> dict:
    """The config.yaml of the run being resumed (RUN_DIR or RUN_DIR/checkpoints/step_N), minus run bookkeeping."""
    from sppo_fast.checkpoint import STEP_DIR

    path = Path(resume)
    run_dir = path.parent.parent if STEP_DIR.match(path.name) else path
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    saved = yaml.safe_load(config.read_text()) or {}
    names = {f.name for f in dataclasses.fields(cls)} - {"resume", "run_name", "out_dir", "overwrite"}
    saved = {k: v for k, v in saved.items() if k in names}
    return load_yaml_values(saved, cls, where=str(config))


def load_yaml_values(values: dict, cls, where: str) -> dict:
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    return {k: coerce(k, v, kinds[k], where) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------------------
# train
def train_parser(demo: dict | None = None) -> argparse.ArgumentParser:
    from sppo_fast.config import Args

    demo = demo if demo is not None else load_preset(DEMO_PRESET, Args)
    demo_text = ", ".join(f"{k}={v}" for k, v in demo.items())
    parser = argparse.ArgumentParser(
        prog="sppo-fast train", usage="sppo-fast train [--preset NAME] [--config FILE.yaml] [--OPTION VALUE ...]",
        description="Train a causal LM with SPPO (or GRPO / PPO) on verifiable rewards.",
        epilog=f"Without --model (and --preset), the embedded tiny model runs the CPU demo with its preset "
               f"sppo_fast/presets/{DEMO_PRESET}.yaml: {demo_text}. Precedence, lowest first: defaults, preset, "
               f"a resumed run's config.yaml, --config, flags.")
    run = parser.add_argument_group("run")
    run.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of options (flags override it)")
    run.add_argument("--preset", default=None, metavar="NAME",
                     help=f"named option set, overridden by --config and flags: {', '.join(preset_names())} "
                          f"(sppo_fast/presets/NAME.yaml; deepscaler-1.5b and dapo-7b are the official SPPO runs')")
    run.add_argument("--debug", action="store_true", help="show the traceback of a configuration error")
    add_dataclass_flags(parser, Args, demo)
    return parser


def build_args(argv=None):
    """Parse `train` flags into a config.Args: preset, resumed config, YAML and flags, in that order, each typed."""
    from sppo_fast.config import Args, ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    ns = vars(train_parser().parse_args(attach_negative_numbers(argv, Args)))
    config_path, preset = ns.pop("config"), ns.pop("preset")
    ns.pop("debug")
    values = dict(ns)
    if config_path:
        values = {**load_yaml(config_path, Args), **values}
    resume = values.get("resume")
    if resume:  # a resumed run keeps its own config; flags and --config given now (e.g. a larger --steps) still win
        values = {**_resumed_config(resume, Args), **values}
    if preset:
        preset_values = load_preset(preset, Args)
        if preset != DEMO_PRESET and not values.get("model"):
            raise ConfigError(f"--preset {preset} is the configuration of a real model's run: give that model's "
                              f"local directory with --model (see sppo_fast/presets/{preset}.yaml)")
        values = {**preset_values, **values}
    elif not values.get("model"):  # the embedded tiny model comes with its own demo hyperparameters
        values = {**load_preset(DEMO_PRESET, Args), **values}
    return Args(**values)


class _Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


def _terminated(signum, frame):
    raise _Terminated


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()  # Python sets signal handlers there only


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sppo-fast {train,plot,export} ...\n\n  train   train a causal LM with SPPO (or GRPO / PPO); "
              "`sppo-fast train` alone runs the CPU demo\n  plot    draw RUN_DIR/metrics.jsonl into a PNG\n"
              "  export  a checkpoint's policy as one model for inference (LoRA merged, 4-bit base dequantized)")
        return 0
    command, rest = argv[0], argv[1:]
    debug = "--debug" in rest or os.environ.get("SPPO_FAST_DEBUG", "") not in ("", "0")
    quiet_third_party()
    # until train.main installs its own handlers (the imports take seconds): SIGTERM stops like Ctrl-C, in one line
    guard = command == "train" and _main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if guard else None
    try:
        if command == "train":
            from sppo_fast.train import main as train_main
            result = train_main(build_args(rest))
            return 128 + result["signal"] if result.get("interrupted") else 0  # 130: SIGINT, 143: SIGTERM
        if command == "plot":
            parser = argparse.ArgumentParser(prog="sppo-fast plot")
            parser.add_argument("run_dir")
            parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
            parser.add_argument("--keys", nargs="*", default=None,
                                help="metrics to draw (default: every one that changes, learning curves first)")
            ns = parser.parse_args(rest)
            from sppo_fast.metrics import plot
            try:
                print(plot(ns.run_dir, ns.out, ns.keys))
            except (FileNotFoundError, ValueError) as e:  # not a run directory, a damaged file: the user's input
                from sppo_fast.config import ConfigError
                raise ConfigError(str(e)) from e
            return 0
        if command == "export":
            from sppo_fast.export import DTYPES
            parser = argparse.ArgumentParser(
                prog="sppo-fast export", description="Merge a checkpoint's LoRA adapters into its base (dequantizing "
                "a 4-bit base) and save one transformers model with the tokenizer, as safetensors.")
            parser.add_argument("source", metavar="CHECKPOINT_OR_RUN",
                                help="RUN_DIR (its newest checkpoint that verifies) or RUN_DIR/checkpoints/step_N")
            parser.add_argument("--out", required=True, metavar="DIR", help="new directory for the model")
            parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                                help="dtype of the saved weights (default: bfloat16)")
            parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
            ns = parser.parse_args(rest)
            from sppo_fast.export import export
            try:
                out, skipped = export(ns.source, ns.out, dtype=ns.dtype)
            except (FileNotFoundError, FileExistsError, ValueError) as e:  # a wrong path, a damaged checkpoint
                from sppo_fast.config import ConfigError
                raise ConfigError(str(e)) from e
            for path, why in skipped:
                print(f"sppo-fast export: skipped {path}: {why}", file=sys.stderr)
            print(out)
            return 0
    except KeyboardInterrupt as e:  # a signal before the run's handlers were in (nothing written) or after they left
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"sppo-fast {command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        from sppo_fast.config import ConfigError
        if not isinstance(e, ConfigError) or debug:
            raise
        print(f"sppo-fast {command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if guard:  # None: a handler not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    print(f"sppo-fast: unknown command {command!r} (expected train, plot or export)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
