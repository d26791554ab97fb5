"""``python -m peft_heft.assets``: prepare the embedded model and data sets in the cache and print where they are."""

from __future__ import annotations

import argparse

from . import TASKS, bigbench_dir, cache_dir, embedded_model_dir, load_task_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bigbench-sdist", help="a local bigbench-1.0.0.tar.gz to extract instead of using pip")
    args = parser.parse_args(argv)
    print(f"peft-heft cache: {cache_dir()}")
    print(f"model: {embedded_model_dir()}")
    print(f"BIG-bench tasks: {bigbench_dir(sdist=args.bigbench_sdist)}")
    for name, info in TASKS.items():
        data = load_task_dataset(name)
        print(f"  {name}: {len(data['train'])} train / {len(data['test'])} test, answers {'/'.join(info.choices)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
