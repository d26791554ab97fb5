"""Two CPU processes (gloo) train both HEFT stages under DDP through `accelerate launch`."""

import json
import os

from conftest import launch_two_cpu_processes


def test_two_process_ddp_trains_both_stages_identically_on_every_rank(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "ddp_staged_script.py")
    proc = launch_two_cpu_processes(script, tmp_path, port=29561)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["backend"] == "gloo" and results["global_step"] == 10
    lora, reft = results["lora"], results["reft"]
    # parameters equal on both ranks after each stage (ranks see different batches: without a DDP wrapper rebuilt
    # over the stage's parameters, the interventions' gradients would not be all-reduced and the ranks would diverge)
    for stage in (lora, reft):
        assert stage["lora_max_rank_diff"] == 0.0 and stage["heft_interventionsmax_rank_diff"] == 0.0
    # each stage trained its own parameters only, through a DDP wrapper rebuilt for its trainable set
    assert lora["lora_changed"] and not lora["heft_interventionschanged"]
    assert reft["heft_interventionschanged"] and not reft["lora_changed"]
    assert lora["ddp_trainable_params"] == 2 * 2 * 2  # q_proj, v_proj x A, B x 2 layers
    assert reft["ddp_trainable_params"] == 2 * 2 * 3  # 2 layers x 2 groups x (R, W weight, W bias)
