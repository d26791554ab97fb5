"""SIGKILL a StagedSFTTrainer.save_model loop at random moments (run by tests/test_save_faults.py).

The trainer is built once; each round forks a child that saves in a loop (save k sets every adapter tensor to the
constant k first, so a loaded folder tells which save it holds and whether it mixes two) and reports each finished
save through a pipe. The parent kills the child with SIGKILL after a random delay, loads the folder with
PeftModel.from_pretrained, and prints one JSON line per round: the newest finished save and the one loaded.
Forking keeps a round at milliseconds instead of a new interpreter's seconds; the kill is a real SIGKILL.
"""

import json
import os
import random
import select
import signal
import sys
import time

import torch
from peft import PeftModel
from sft_fixtures import cpu_sft_args, make_dataset, tiny_sft_model, tiny_tokenizer

from peft_heft import HeftConfig, StagedSFTTrainer

STAGING_PREFIX = (
    ".heft-save-"  # peft_heft.persistence.STAGING_PREFIX, spelled out so the harness also runs on old code
)

output_dir, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
config = HeftConfig(
    task_type="CAUSAL_LM",
    r=4,
    target_modules=["q_proj", "v_proj"],
    intervention_layers=[0, 1],
    intervention_rank=2,
    intervention_positions="f2+l2",
)
trainer = StagedSFTTrainer(
    tiny_sft_model(),
    args=cpu_sft_args(output_dir + "-run"),
    train_dataset=make_dataset("prompt_completion", 8),
    processing_class=tiny_tokenizer(),
    peft_config=config,
)
params = [p for n, p in trainer.model.named_parameters() if "lora_" in n or "heft_interventions" in n]


def save_loop(first: int, report: int) -> None:
    k = first
    while True:
        with torch.no_grad():
            for p in params:
                p.fill_(float(k))
        trainer.save_model(output_dir)
        os.write(report, f"{k}\n".encode())
        k += 1


def loaded_generation() -> tuple[int, ...]:
    model = PeftModel.from_pretrained(tiny_sft_model(), output_dir)
    values = {
        float(v)
        for n, p in model.named_parameters()
        if "lora_" in n or "heft_interventions" in n
        for v in p.detach().flatten().unique()
    }
    return tuple(sorted(int(v) for v in values))


def timed_save() -> float:
    start = time.perf_counter()
    trainer.save_model(output_dir + "-timing")
    return time.perf_counter() - start


save_seconds = min(timed_save() for _ in range(3))
rng = random.Random(seed)
last_complete, next_k = None, 1
for index in range(rounds):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: save until killed
        os.close(read_end)
        try:
            save_loop(next_k, write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    if last_complete is None:
        # the first round waits for a finished save (a fixed delay left every round unchecked on a loaded CI box),
        # then lets a few more finish
        ready, _, _ = select.select([read_end], [], [], 300)
        if not ready:
            raise SystemExit("no save finished within 300 s")
        time.sleep(3 * save_seconds)
    else:  # later rounds kill within the first few saves, anywhere inside one
        time.sleep(rng.uniform(0.0, 3 * save_seconds))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        finished = [int(line) for line in pipe.read().split()]
    if finished:
        last_complete = finished[-1]
    try:
        got = loaded_generation() if last_complete is not None else None
    except Exception as error:  # the folder does not load: the save was lost
        got = None
        print(json.dumps({"round": index, "load_error": repr(error)[:300]}), flush=True)
    litter = sorted(n for n in os.listdir(output_dir) if n.startswith(STAGING_PREFIX)) if last_complete else []
    print(json.dumps({"round": index, "last_complete": last_complete, "loaded": got, "litter": litter}), flush=True)
    if got and len(got) == 1:
        next_k = max(got[0], last_complete or 0) + 1
        # a save cut after its commit point is the folder's newest complete save, though its child never reported
        # it: the next round's "old adapter" is that one (else a next cut save reads as two saves ahead)
        last_complete = max(got[0], last_complete or 0)
print(json.dumps({"save_seconds": save_seconds}), flush=True)
