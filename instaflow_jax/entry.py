"""The one entry helper of the command-line tools and jobs: user errors (bad flags, bad input)
as one ``error:`` line and exit status 2 (:func:`run_cli` for argparse tools, :func:`run_absl` for
absl ones, :func:`exit_on_user_errors` for a job's run), and third-party log quieting.

It names the pipeline's, models' and weights' errors, so it sits at the pipeline's layer: jobs
(``train``, ``generate_triplets``) and apps (``cli``, ``demo``, ``examples``) import it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from instaflow_jax.models import ConfigError
from instaflow_jax.pipeline import InsufficientMemoryError
from instaflow_jax.weights import SafetensorsError, WeightsMismatchError


def plain_text(doc: str, paragraphs: int = 1) -> str:
    """A docstring's first ``paragraphs`` without reST markup (``code``, :func:`name`), for --help."""
    kept = doc.strip().split("\n\n")[:paragraphs]
    kept = [re.sub(r":\w+:`~?([^`]+)`", r"\1", p).replace("``", "") for p in kept]
    return "\n\n".join(" ".join(p.split()) for p in kept)


def quiet_third_party() -> None:
    """Silence other libraries' start-up noise unless asked for (an environment variable already
    set wins): transformers' advice ("PyTorch was not found…"), TensorFlow/gRPC C++ logs, and absl
    INFO logs (orbax writes a dozen lines per checkpoint) unless ``--verbosity`` is given."""
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TF_CPP_MIN_LOG_LEVEL", "2"),
        ("GRPC_VERBOSITY", "ERROR"),
    ):
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # imported already: its environment was read
        sys.modules["transformers"].logging.set_verbosity_error()
    if not any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv[1:]):
        from absl import logging

        logging.set_verbosity(logging.WARNING)


USER_ERRORS = (
    FileNotFoundError,
    ConfigError,
    WeightsMismatchError,
    SafetensorsError,
    ValueError,
    InsufficientMemoryError,
)


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn user errors (bad flags included) into one ``error:`` line and exit status 2."""

    def one_line_error(message: str) -> None:
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error  # argparse's own: the usage, then "prog: error: …"
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # a bad flag: status 2, as from a run (--help exits 0 as usual)
        if not done.code:
            raise
        return int(done.code)
    quiet_third_party()
    try:
        main(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def exit_on_user_errors() -> Iterator[None]:
    """Around a job's run: a user error (``USER_ERRORS``) prints one ``error:`` line and exits 2."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def program_name(argv0: str) -> str:
    """How the user started the program: ``instaflow-train`` or ``python -m instaflow_jax.train``."""
    parts = os.path.normpath(argv0).split(os.sep)
    if not argv0.endswith(".py") or "instaflow_jax" not in parts:
        return os.path.basename(argv0)
    module = parts[parts.index("instaflow_jax") :]
    module[-1] = module[-1][: -len(".py")]
    return "python -m " + ".".join(m for m in module if m != "__main__")


def config_keys(config: Any, prefix: str) -> list[tuple[str, Any]]:
    """Every leaf of a (nested) ConfigDict as (``prefix.key.subkey``, value), in key order."""
    out = []
    for key, value in sorted(config.items()):
        if hasattr(value, "items"):
            out += config_keys(value, f"{prefix}.{key}")
        else:
            out.append((f"{prefix}.{key}", value))
    return out


def absl_help(doc: str, argv: list[str]) -> str:
    """--help of an absl program: its description, every flag it defines with its default, and the
    keys of its config (the default one, or the ``--config`` given) as ``--config.KEY=VALUE``."""
    import textwrap

    from absl import flags

    ours = [  # the program's own flags, not those other libraries define on import
        flag
        for module, defined in flags.FLAGS.flags_by_module_dict().items()
        if module.startswith("instaflow_jax") or module == argv[0]
        for flag in defined
    ]
    paragraphs = plain_text(doc, paragraphs=2).split("\n\n")
    if not paragraphs[0].startswith(("python -m", "instaflow-")):  # a command alone says too little
        paragraphs = paragraphs[:1]
    description = "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)
    lines = [f"usage: {program_name(argv[0])} [flags]", "", description, "", "flags:"]
    configs = []
    for flag in sorted(ours, key=lambda f: f.name):
        given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{flag.name}=")]
        given += [argv[i + 1] for i, a in enumerate(argv[1:-1], 1) if a == f"--{flag.name}"]
        if type(flag).__name__ == "_ConfigFlag":
            try:
                if given:
                    flag.parse(given[-1])
                if flag.value is not None:
                    configs.append((flag.name, flag.value))
            except Exception as err:  # --help must print even for a broken config
                lines.append(f"  (could not read --{flag.name} {given[-1]}: {str(err).splitlines()[-1]})")
            default = "default: the default config"
        else:
            default = f"default: {flag.default}"
        if flag.default is None:
            required = any("other than None" in getattr(v, "message", "") for v in flag.validators)
            default = "required" if required else "default: none"
        text = f"{plain_text(flag.help)} ({default})"
        lines.append(f"  --{flag.name}")
        lines += textwrap.wrap(text, 96, initial_indent="      ", subsequent_indent="      ")
    lines += [
        "  --verbosity N",
        "      absl log level: 0 shows INFO logs, which are off by default (default: -1, warnings).",
        "  --helpfull",
        "      also list absl's own flags.",
    ]
    for name, config in configs:
        lines += ["", f"config keys (override any with --{name}.KEY=VALUE; unknown keys are refused):"]
        lines += [f"  --{key}={value!r}" for key, value in config_keys(config, name)]
    if not configs:
        lines += [
            "",
            "Give --config FILE with --help to list its keys (override any with --config.KEY=VALUE).",
        ]
    return "\n".join(lines)


def flag_error_message(err: Exception) -> str:
    """absl's flag-parsing error as one line: the last line of an embedded traceback (a config
    file's own error), or "--name is required" for a missing flag."""
    text = str(err).strip()
    missing = re.search(r"Flag (--\w+) must have a value other than None", text)
    if missing:
        return f"{missing.group(1)} is required (see --help)."
    if "Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1].strip()
        return re.sub(r"^[\w.]*(Error|Exception): ", "", text)
    return text.splitlines()[0]


def run_absl(main: Callable[[list[str]], None], doc: str | None = None) -> None:
    """``absl.app.run`` with a plain --help (:func:`absl_help`; ``doc`` defaults to the docstring
    of ``main``'s module) and flag errors as one ``error:`` line and exit status 2.

    Only flag parsing and usage errors are guarded: errors raised by ``main`` itself keep their
    traceback."""
    from absl import app, flags

    if any(arg in HELP_ARGS for arg in sys.argv[1:]):
        with contextlib.suppress(BrokenPipeError):  # e.g. piped into head
            print(absl_help(doc or sys.modules[main.__module__].__doc__ or "", sys.argv))
        sys.exit(0)

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as err:
            print(f"error: {flag_error_message(err)}", file=sys.stderr)
        except (AttributeError, KeyError) as err:  # ml_collections' override errors
            message = str(err).strip("'\"").replace("\\n", " ").replace('\\"', '"').replace("\\'", "'")
            print(f"error: unknown or invalid config override: {message}", file=sys.stderr)
        sys.exit(2)

    def guarded(argv: list[str]) -> None:
        quiet_third_party()
        try:
            main(argv)
        except app.UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=parse_flags)
