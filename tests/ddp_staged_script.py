"""Run by test_trainer_ddp.py under `accelerate launch --num_processes 2 --cpu`: train both HEFT stages with DDP.

After each stage every rank gathers all adapter parameters; rank 0 writes the largest difference between ranks,
what changed in the stage and the DDP wrapper's parameter count to results.json.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer  # noqa: E402

from peft_heft import HeftCallback, StagedSFTTrainer  # noqa: E402


def adapter_vector(model, kind):
    parts = [p.detach().flatten() for n, p in sorted(model.named_parameters()) if kind in n]
    return torch.cat(parts)


class CheckRanks(HeftCallback):
    def __init__(self):
        self.results = {}
        self.begin = {}

    def on_stage_begin(self, args, state, control, stage=None, model=None, **kwargs):
        self.begin = {k: adapter_vector(model, k) for k in ("lora_", "heft_interventions")}

    def on_step_end(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
        # parameters this DDP wrapper all-reduces: it registers the trainable ones when it is built
        self.ddp_params = len([p for p in wrapped.parameters() if p.requires_grad])

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        out = {"ddp_trainable_params": self.ddp_params}
        for kind in ("lora_", "heft_interventions"):
            vec = adapter_vector(model, kind)
            gathered = [torch.zeros_like(vec) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, vec)
            out[f"{kind}max_rank_diff"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
            out[f"{kind}changed"] = bool((vec - self.begin[kind]).abs().max() > 0)
        self.results[stage] = out


def main(output_dir):
    args = cpu_sft_args(
        output_dir, per_device_train_batch_size=4, lora_max_steps=5, reft_max_steps=5, gradient_checkpointing=True
    )
    config = sft_heft_config()
    check = CheckRanks()
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 32),
        processing_class=tiny_tokenizer(),
        peft_config=config,
        callbacks=[check],
    )
    check.trainer = trainer
    out = trainer.train()
    if trainer.is_world_process_zero():
        check.results["world_size"] = dist.get_world_size()
        check.results["backend"] = dist.get_backend()
        check.results["global_step"] = out.global_step
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump(check.results, handle)
    # Pass a barrier after the last collective on Python tensors (the all_gather above): gloo's worker thread frees
    # them (taking the GIL) after the caller got its result, and a group torn down at once while the GIL is held
    # joins that thread and hangs (seen in CI with examples/accelerate_two_processes.py).
    trainer.accelerator.wait_for_everyone()
    # Leave the gloo group cleanly: a process that exits with the group alive can abort in its threads' teardown
    # ("terminate called without an active exception", seen once in CI after both stages had trained)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
