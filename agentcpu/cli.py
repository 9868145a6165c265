"""`agentcpu serve | chat | generate | demo | bench | doctor` — the command line.

Each subcommand lives in its own module and is imported only when used, so
`agentcpu doctor` never loads a model and `agentcpu --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from agentcpu.errors import AgentCPUError

# subcommand -> (module, help); each module defines add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": ("agentcpu.commands.demo", "the embedded model solves tool-use tasks as agents"),
    "serve": ("agentcpu.commands.serve", "OpenAI-compatible HTTP server"),
    "generate": ("agentcpu.commands.generate", "generate text from a prompt, streamed"),
    "doctor": ("agentcpu.commands.doctor", "CPU features, measured limits, model roofline"),
    "bench": ("agentcpu.commands.bench", "offline engine benchmarks against the roofline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentcpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # serve sets up logging from --log-level
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("agentcpu").setLevel(logging.INFO)  # load summaries, fallbacks
    try:
        return importlib.import_module(args.module).run(args)
    except AgentCPUError as e:
        print(f"agentcpu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
