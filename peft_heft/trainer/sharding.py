"""`StagedSFTTrainer` under FSDP2 and DeepSpeed (ZeRO-1/2/3): what the stages need that transformers does not do.

- Saves gather the whole adapter (LoRA, trainable or frozen, and the interventions) on every rank and write it on the
  main process, through HEFT's atomic save for a user's save. transformers' sharded saves keep only the parameters
  trainable at save time (ZeRO-3 `exclude_frozen_parameters=True`, accelerate's FSDP2 adapter-only state dict with
  `ignore_frozen_params=True`), which drops the frozen LoRA of the ReFT stage.
- Resuming loads the checkpoint's complete adapter before `prepare` (the engines' own files lack frozen parameters).
- DeepSpeed builds one engine per stage: the previous one is released first.
- FSDP2 shards each intervention in its own unit, computing in its own dtype (not the root unit's bf16).

What is refused, and why: `validation.check_sharding_supported`. Tests: `tests/test_trainer_sharded.py`; results:
`benchmarks/results/cpu_sharding_check.md`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from ..persistence import save_trainer_output
from ..tuner.model import INTERVENTIONS_ATTR
from .mixin_base import SFTTrainerBase

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    from ..tuner.model import HeftModel
    from .config import HeftSFTConfig


class ShardedStagesMixin(SFTTrainerBase):
    """Mixed into `StagedSFTTrainer` (before `SFTTrainer`): the FSDP2 / DeepSpeed parts of saving, resuming and
    switching stages."""

    if TYPE_CHECKING:  # attributes StagedSFTTrainer sets, methods of its other mixins
        args: HeftSFTConfig  # type: ignore[assignment]
        model: Any
        _heft: HeftModel

        @property
        def _output_dir(self) -> str: ...

        def write_heft_card(
            self,
            folder: str,
            *,
            model_id: str | None = None,
            dataset_name: str | None = None,
            tags: list[str] | None = None,
        ) -> None: ...

    @property
    def _sharded(self) -> bool:
        """FSDP2 or DeepSpeed: the model is prepared into a sharded or partitioned form (`check_supported`)."""
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _release_stage_engine(self) -> None:
        """DeepSpeed builds one engine per stage (each `prepare` with the stage's optimizer). The previous stage's
        engine would keep its hooks on the model (ZeRO-3's parameter fetching around each module, its ZeRO optimizer's
        gradient hooks, the engine's own forward hooks) next to the new engine's. `DeepSpeedEngine.destroy()` removes
        the ZeRO ones, the two handles below the engine's own; the parameters stay partitioned and the next engine
        takes them over. (ZeRO-3 with non-reentrant gradient checkpointing still fails in the second stage with this:
        refused in `check_sharding_supported`.) FSDP2 shards in place once: the next stage prepares the same module."""
        engine = self.model_wrapped
        if self.is_deepspeed_enabled and engine is not None and engine is not self.model:
            destroy = getattr(engine, "destroy", None)
            if callable(destroy):
                destroy()
            for name in ("module_forward_pre_hook", "module_forward_post_hook"):  # the engine's own, left by destroy
                handle = getattr(engine, name, None)
                if handle is not None:
                    handle.remove()
            self.deepspeed = None

    def _shard_interventions_in_their_dtype(self) -> None:
        """FSDP2: give each intervention its own FSDP unit that computes in the intervention's own dtype.

        accelerate's transformer-based wrap shards each decoder layer, the embeddings and the head, and leaves the rest
        (here: the interventions, a ModuleDict on the tuner, outside the layers) in the root unit, whose mixed-precision
        policy casts them to bf16 for compute. HEFT computes interventions in their own dtype (float32, as PEFT keeps
        LoRA), and the LoReFT/DiReFT rotation's Householder product has no bf16 kernel (CPU: `"orgqr_cpu" not
        implemented for 'BFloat16'`; cuSOLVER's orgqr is float/double/complex). So each intervention is sharded here
        first, with `MixedPrecisionPolicy()` (no cast), the mesh, resharding and offload accelerate uses; accelerate
        then skips modules that are already sharded. The cost is one all-gather of r x d (+ r) values per intervention
        in forward and in backward.
        """
        if not (self.is_fsdp_enabled and getattr(self.accelerator, "is_fsdp2", False)):
            return
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        plugin = self.accelerator.state.fsdp_plugin
        modules = [m for group in self._heft.heft_interventions.values() for m in group.children()]
        todo = [m for m in modules if not isinstance(m, FSDPModule) and any(True for _ in m.parameters())]
        if not todo:
            return
        if isinstance(self.model, FSDPModule):
            # prepared without them (an `evaluate()` before the first stage): they are in the root unit already
            logger.warning(
                "FSDP2 sharded the model before the first stage (evaluate() before train()?): the interventions stay "
                "in the root FSDP unit and compute in its mixed-precision dtype. Train first to keep them in their "
                "own dtype."
            )
            return
        if plugin.cpu_ram_efficient_loading:
            raise ValueError(
                "StagedSFTTrainer under FSDP2 does not support fsdp_cpu_ram_efficient_loading=True: the HEFT model is "
                "built (and its adapter injected) before the trainer, on every process. Set "
                "fsdp_cpu_ram_efficient_loading: false in accelerate's config (examples/accelerate/fsdp2.yaml)."
            )
        mesh = getattr(self.accelerator, "torch_device_mesh", None)
        if mesh is not None:
            mesh = mesh[tuple(self.accelerator.parallelism_config.fsdp_dim_names)]
        for module in todo:
            fully_shard(
                module,
                mesh=mesh,
                reshard_after_forward=plugin.reshard_after_forward,
                offload_policy=plugin.cpu_offload,
                mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False),
            )

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters and saved buffers (LoRA, trainable or frozen, and the interventions), by model key
        (the keys of `state_dict()`: non-persistent buffers are left out, as from an unsharded save)."""
        prefix = self._heft.prefix
        saved = set(self.model.state_dict())
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return {n: t for n, t in named if n in saved and (prefix in n or f"{INTERVENTIONS_ATTR}." in n)}

    def _gathered_adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank calls this (collectives): the adapter's full tensors, unsharded, as CPU copies.

        FSDP2 parameters are `DTensor`s (`full_tensor()` gathers one); ZeRO-3 parameters are partitioned
        (`deepspeed.zero.GatheredParameters` gathers them); ZeRO-1/2 and buffers are whole on every rank. transformers'
        own sharded saves keep only the parameters trainable at save time (FSDP2: `ignore_frozen_params=True`, ZeRO-3:
        `exclude_frozen_parameters=True`), which drops the frozen LoRA of a ReFT stage; this keeps all of them.
        """
        from contextlib import nullcontext

        tensors = self._adapter_tensors()
        partitioned = [t for t in tensors.values() if hasattr(t, "ds_id")]
        if partitioned:
            import deepspeed

            gather: Any = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
        else:
            gather = nullcontext()
        from torch.distributed.tensor import DTensor

        state_dict = {}
        with gather:
            for name, tensor in tensors.items():  # the same order on every rank
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                name = name.replace("_checkpoint_wrapped_module.", "")  # accelerate's FSDP activation checkpointing
                state_dict[name] = full.detach().to("cpu", copy=True).contiguous()
        return state_dict

    def _write_adapter(self, folder: str, state_dict: dict[str, torch.Tensor]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(folder, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)

    def _save_sharded(self, output_dir: str | None, internal: bool) -> None:
        """FSDP2 / DeepSpeed: gather the whole adapter on every rank, write it on the saving process (atomically for a
        user's save, as without sharding; a checkpoint is completed by its marker instead)."""
        state_dict = self._gathered_adapter_state_dict()
        if not self.args.should_save:
            return
        if internal:
            if output_dir is None:
                output_dir = self._output_dir
            os.makedirs(output_dir, exist_ok=True)
            self._write_adapter(output_dir, state_dict)
            return
        target = output_dir if output_dir is not None else self._output_dir

        def write(staging: str) -> None:
            self._write_adapter(staging, state_dict)
            self.write_heft_card(staging, model_id=target)

        save_trainer_output(target, self.args, write)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_complete_adapter(self, checkpoint: str) -> None:
        """Before `prepare` (FSDP2 / DeepSpeed): load the checkpoint's complete adapter (`adapter_model.safetensors`,
        written gathered by `save_model`) into the still plain model."""
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in self.model.parameters()):
            raise RuntimeError(
                f"Cannot resume from {checkpoint} in this process: the model is already sharded by an earlier "
                "train() call under FSDP2 / DeepSpeed ZeRO-3. Resume in a new process (a new trainer and model)."
            )
        self.model.load_adapter(checkpoint, self.model.active_adapter, is_trainable=True)
