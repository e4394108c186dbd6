"""Lets the scripts run from a checkout (``python scripts/x.py``) without installing peftjax."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Imported first so that peftjax's allocator setting (peftjax.runtime) is in place before jax
# or torch start their threads.
import peftjax  # noqa: E402,F401

# Exit codes of the scripts (README, "Troubleshooting"): 0 done, 1 an unexpected error (with its
# traceback), 2 bad input (a config field, value, file or workdir: one message, no traceback),
# 3 training stopped on a non-finite loss/gradient/state (the last good checkpoint is kept).
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3


def _config_field_error(e: BaseException, argv: list[str]) -> str:
    """A readable line for an unknown ``--config.<path>`` override (ml_collections raises an
    AttributeError/KeyError whose text is the key and a "Did you mean" hint)."""
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--") and
                 a.split("=")[0].rsplit(".", 1)[-1] == key), None)
    where = f"{flag}: " if flag else ""
    return f"{where}unknown config field {key!r}" + (f"; {hint.strip()}" if hint.strip() else "")


def run(main) -> None:
    """``absl.app.run(main)`` where bad input ends in one clean line on stderr and exit code 2
    instead of a traceback (set PEFTJAX_TRACEBACK=1 to see it), and a diverged run in code 3."""
    from absl import app, flags

    from peftjax.models.hf_io import CheckpointError
    from peftjax.train.checkpoint import CheckpointError as RestoreError
    from peftjax.gpu_target import TargetUnavailable
    from peftjax.train.loop import NonFiniteLossError

    show = os.environ.get("PEFTJAX_TRACEBACK", "") not in ("", "0")

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            if show:
                raise
            # config_flags reports an error of the config file (an unknown model, task or
            # method) with its traceback: keep the last line, the error itself
            text = str(e).strip()
            if "Traceback (most recent call last)" in text:
                last = [ln for ln in text.splitlines() if ln.strip()][-1]
                print(f"error: {last.split(': ', 1)[-1]}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
            # absl's own message (an unknown flag names itself). Not app.parse_flags_with_usage:
            # parsing a second time redefines every --config.* override flag and reports that
            # ("defined twice") instead of the real error.
            print(f"error: {text}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except (AttributeError, KeyError) as e:
            if show:
                raise
            print(f"error: {_config_field_error(e, argv)}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except (TypeError, ValueError) as e:
            if show:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    def guarded(argv):
        try:
            return main(argv)
        except NonFiniteLossError as e:
            if show:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_NON_FINITE)
        except (ValueError, FileNotFoundError, CheckpointError, RestoreError, TargetUnavailable) as e:
            if show:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    app.run(guarded, flags_parser=parse)
