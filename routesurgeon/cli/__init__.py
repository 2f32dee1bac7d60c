"""The ``routesurgeon`` command line: inspect, export and visualise models named like timm/smp do.

``routesurgeon inspect timm:resnet50 --heads 3``, ``routesurgeon inspect smp:Unet:resnet34
--aux-classes 5``, ``routesurgeon export timm:resnet18 --keep 0.5 --out routes/``, ``routesurgeon
viz timm:resnet50 --out report.html``, ``routesurgeon methods``, ``routesurgeon conflicts
timm:resnet18 --data synthetic``. ``main(argv)`` returns the exit
code: 0 on success, 2 on a usage or model error (one line on stderr; ``--debug`` shows the
traceback), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from routesurgeon.cli import _conflicts, _export, _inspect, _methods, _viz
from routesurgeon.cli._inspect import inspect_data as inspect_data
from routesurgeon.cli._loading import Loaded as Loaded
from routesurgeon.cli._output import EXIT_FAILURE, EXIT_USAGE, _console
from routesurgeon.cli._output import EXIT_OK as EXIT_OK
from routesurgeon.errors import RouteSurgeonError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from routesurgeon import __version__

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )
    parser = argparse.ArgumentParser(
        prog="routesurgeon",
        description="Trace multi-output models, see which filters their tasks share, and export "
        "one pruned route per task.",
    )
    parser.add_argument("--version", action="version", version=f"routesurgeon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _inspect.add_parser(sub, debug)
    _export.add_parser(sub, debug)
    _viz.add_parser(sub, debug)
    _methods.add_parser(sub, debug)
    _conflicts.add_parser(sub, debug)
    return parser


# -- entry point -------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    """The error as one line: its first line, plus the 'What to do' advice if it has one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    advice = [ln for ln in lines[1:] if ln.lower().startswith("what to do")]
    text = lines[0]
    for more in advice:
        text += (" " if text.endswith((".", ";", ":")) else ". ") + more
    # the library's advice names the Python argument; the CLI's flag is --leaf-modules
    return re.sub(r"leaf_modules=\[([^\]]*)\]", r"--leaf-modules \1", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage/model error, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    out, err = _console(sys.stdout), _console(sys.stderr)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.run(args, out, err))
    except (RouteSurgeonError, NotImplementedError, FileExistsError) as e:
        if debug:
            raise
        print(f"routesurgeon {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"routesurgeon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"routesurgeon {args.command}: failed: {type(e).__name__}: {_one_line(e)} "
            f"(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
