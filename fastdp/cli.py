"""The ``fastdp`` command line: demo, bench, theory, experiment, audit.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only routes,
importing the module when its subcommand runs so ``fastdp demo`` never pays for the others.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

SUBCOMMANDS = {
    "demo": ("fastdp.demo", "DP-SGD on MNIST-1D against the same run without privacy"),
    "bench": ("fastdp.bench.cli", "throughput and memory against non-private and Opacus"),
    "theory": ("fastdp.theory.cli", "continuous-time Noisy-SGD models: lls | dln"),
    "experiment": ("fastdp.theory.experiments.cli", "batch-size sweeps at fixed sigma/B"),
    "audit": ("fastdp.audit", "privacy audit: canary sensitivity check and empirical epsilon"),
}


def _usage() -> str:
    lines = ["usage: fastdp [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'fastdp <command> --help' for the options of one command."]
    return "\n".join(lines)


def version() -> str:
    """The installed fastdp's version (without importing torch)."""
    try:
        return importlib.metadata.version("fastdp")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        from fastdp import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"fastdp {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fastdp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
