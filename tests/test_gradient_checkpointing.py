"""Gradient checkpointing does not re-run HEFT's decoder-layer hooks in ``backward()``.

transformers (>= 5.25, the lower bound) checkpoints a ``GradientCheckpointingLayer``'s ``forward``, not its
``__call__``: module hooks stay outside the checkpoint, so the recomputation in ``backward()`` never calls HEFT's
layer hook. The tuner therefore needs no plan for "a layer recomputed by backward() in an autograd worker thread"
(where this call's context is not visible): these tests fail if transformers moves the checkpoint back around
``__call__``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import get_peft_model


def _count_layer_hook_calls(model) -> list[int]:
    """Wrap HEFT's forward hook on each decoder layer with a counter; returns the (shared, one-item) counter."""
    calls = [0]
    for layer in model.base_model.model.model.layers:
        for key, hook in list(layer._forward_hooks.items()):

            def counting(*args, _hook=hook, **kwargs):
                calls[0] += 1
                return _hook(*args, **kwargs)

            layer._forward_hooks[key] = counting
    return calls


def _gradients(checkpointing: bool | None, backward_in_thread: bool = False):
    """Gradients of one training step in stage 'joint', and the layer hook's call count in forward and backward."""
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    model = get_peft_model(tiny_llama(), heft_config())
    model.base_model.set_stage("joint")
    randomize_interventions(model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    assert model.base_model.model.model.layers[0].gradient_checkpointing is (checkpointing is not None)
    calls = _count_layer_hook_calls(model)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    in_forward = calls[0]
    if backward_in_thread:
        # A fresh thread has an empty contextvars context, as an autograd device thread (GPU) does: a hook re-run
        # there would not find this call's plan.
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
    else:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, in_forward, calls[0] - in_forward


@pytest.mark.parametrize("backward_in_thread", [False, True])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_gradients_equal_and_layer_hooks_do_not_rerun(use_reentrant, backward_in_thread):
    reference, ref_forward, ref_backward = _gradients(None)
    grads, in_forward, in_backward = _gradients(use_reentrant, backward_in_thread)
    assert (ref_forward, ref_backward) == (2, 0)  # intervention_layers=[1, -1]: one hook call each per forward
    assert (in_forward, in_backward) == (2, 0)  # the checkpoint's recomputation does not call the layer hooks
    assert reference.keys() == grads.keys()
    assert any("lora_" in n for n in grads) and any("heft_interventions" in n for n in grads)
    for name in reference:
        assert reference[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=0)
