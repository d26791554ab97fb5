"""``python -m peft_heft.lm_eval ...``: lm-evaluation-harness' command line with the ``heft`` model registered."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import check_cli_arguments


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m peft_heft.lm_eval ...``: lm_eval's command line, with the ``heft`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    arguments = list(sys.argv[1:] if argv is None else argv)
    check_cli_arguments(arguments)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lm_eval", *arguments]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
