"""``HeftDPOTrainer``: TRL's ``DPOTrainer`` on a HEFT adapter, interventions on the prompt of both sequences.

TRL runs each preference pair as two rows, prompt + chosen and prompt + rejected, and calls the model with
``labels`` = the completion tokens (prompt and padding are -100). A HEFT model reads its prompt from those labels
(:mod:`peft_heft.prompt_tokens`): the real tokens before the first supervised label. So the interventions sit on the
prompt of both rows, the tokens `generate()` intervenes on at inference, for the policy and the reference forward
alike; nothing in TRL's loss needs to change.

What this module adds to TRL: the stage to train (``HeftDPOConfig.heft_stage``), the reference model (the starting
adapter, frozen, with its interventions applied), stage flags that survive TRL's adapter switching and checkpoint
loading, early refusals of what cannot work, and an adapter folder saved like `StagedSFTTrainer`'s.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from accelerate.utils import is_peft_model
from peft import PeftConfig
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer

from ..modelcard import replace_quick_start, update_model_card
from ..persistence import save_trainer_output
from ..tuner.config import HeftConfig
from ..tuner.model import HeftModel, _find_heft_tuner
from .config import STAGE_NAMES
from .labelled_lm_head import score_labelled_positions_only

logger = logging.get_logger(__name__)

DPO_STAGES = STAGE_NAMES  # every trainable stage of settings.STAGES
REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer looks for (`"ref" in model.peft_config`)
POLICY_ADAPTER = "default"  # the adapter TRL's DPOTrainer copies into "ref"


@dataclass
class HeftDPOConfig(DPOConfig):
    r"""
    Configuration for [`HeftDPOTrainer`]: every [`~trl.DPOConfig`] option, plus the HEFT part to train.

    Args:
        heft_stage (`str`, *optional*, defaults to `"reft"`):
            What DPO trains. `"reft"`: the interventions, with LoRA frozen but applied; `"lora"`: LoRA, with the
            interventions applied and frozen; `"joint"`: both. Whatever is not trained stays as the starting adapter
            has it, and is applied.

    Example:
    ```python
    >>> from peft_heft import HeftDPOConfig
    >>> args = HeftDPOConfig(output_dir="out-dpo", heft_stage="reft", learning_rate=1e-3, beta=0.1)
    ```
    """

    heft_stage: str = field(
        default="reft",
        metadata={
            "help": "What DPO trains: 'reft' (the interventions; LoRA frozen but applied), 'lora' (LoRA; the "
            "interventions applied and frozen) or 'joint' (both).",
            "choices": list(DPO_STAGES),
        },
    )

    def __post_init__(self):
        stage = self.heft_stage.strip().lower() if isinstance(self.heft_stage, str) else self.heft_stage
        if stage not in DPO_STAGES:
            raise ValueError(
                f"heft_stage={self.heft_stage!r} is not a HEFT stage DPO can train; use one of {DPO_STAGES}: 'reft' "
                "trains the interventions, 'lora' the LoRA weights, 'joint' both."
            )
        self.heft_stage = stage
        super().__post_init__()


class HeftDPOTrainer(DPOTrainer):
    r"""
    [`~trl.DPOTrainer`] for HEFT adapters: preference tuning of the interventions, LoRA, or both.

    Takes the same arguments as [`~trl.DPOTrainer`]. `model` is a HEFT `PeftModel`, typically the output of
    [`StagedSFTTrainer`] loaded with `PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)` (the adapter
    named `"default"`), or a base model (or its id) with `peft_config=HeftConfig(...)` for a new adapter.
    `args.heft_stage` ([`HeftDPOConfig`]) chooses what trains; a plain `DPOConfig` trains the interventions.

    Interventions go on the prompt tokens of both the chosen and the rejected sequence, in the policy and the reference
    forward: TRL passes the completion as `labels` (prompt and padding -100), and a HEFT model takes the tokens before
    the first label as the prompt.

    The reference model is the starting adapter: a frozen copy named `"ref"` (TRL's own mechanism for a `PeftModel`;
    this trainer makes it for a new adapter too, and keeps its interventions applied), so the DPO loss starts at
    log 2 and the KL anchor is the SFT model the training starts from. Pass `ref_model=` to use another model instead
    (for example the base model). `save_model()` writes the trained adapter alone (not the `"ref"` copy), atomically,
    as `StagedSFTTrainer` does; `PeftModel.from_pretrained` reloads it.

    Args:
        model (`str` or `PreTrainedModel` or `PeftModel`): a HEFT `PeftModel`, or a base model (or its id) together
            with `peft_config`.
        ref_model (`PreTrainedModel`, *optional*): another reference model; by default the starting adapter.
        args (`HeftDPOConfig` or `DPOConfig`, *optional*): the DPO options and `heft_stage`.
        data_collator (`Callable`, *optional*): TRL's preference collator when `None`.
        train_dataset (`datasets.Dataset`): preference data (`prompt`, `chosen`, `rejected`), as TRL reads it.
        eval_dataset (`datasets.Dataset`, *optional*): evaluated per `eval_strategy`.
        processing_class (`PreTrainedTokenizerBase`, *optional*): the tokenizer.
        peft_config (`HeftConfig`, *optional*): the adapter to create when `model` is not a HEFT `PeftModel`.
        **kwargs (`Any`): passed to `DPOTrainer` (`compute_metrics`, `callbacks`, `optimizers`, ...).

    Example:
    ```python
    >>> import peft_heft
    >>> from peft import PeftModel
    >>> from peft_heft import HeftDPOConfig, HeftDPOTrainer
    >>> model = PeftModel.from_pretrained(base, "out/heft-sft", is_trainable=True)  # a StagedSFTTrainer output
    >>> trainer = HeftDPOTrainer(model, args=HeftDPOConfig("out/heft-dpo", heft_stage="reft"),
    ...                          train_dataset=preferences, processing_class=tokenizer)
    >>> trainer.train()
    >>> trainer.save_model()
    ```
    """

    args: HeftDPOConfig
    model: Any
    _tag_names = ["trl", "dpo", "peft-heft", "heft"]
    _name = "HEFT DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        peft_config: PeftConfig | None = None,
        **kwargs,
    ):
        if args is not None and not isinstance(args, DPOConfig):
            raise TypeError(
                f"HeftDPOTrainer needs args=HeftDPOConfig(...) (or a trl.DPOConfig), got {type(args).__name__}."
            )
        _check_model(model, ref_model, peft_config)
        if args is not None:
            _check_args(args)
        self._heft_stage = str(getattr(args, "heft_stage", "reft"))
        self._owns_reference = False  # whether this trainer holds the "ref" adapter (never saved as the user's)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._prepare_heft()
        score_labelled_positions_only(self._peft_model().get_base_model())
        if self.ref_model is not None:
            score_labelled_positions_only(self.ref_model)

    # ------------------------------------------------------------------ the adapters and their stages
    @property
    def heft_stage(self) -> str:
        """What this trainer trains: `"reft"`, `"lora"` or `"joint"`."""
        return self._heft_stage

    def _peft_model(self):
        return self.accelerator.unwrap_model(self.model)

    def _heft_tuner(self) -> HeftModel:
        tuner = _find_heft_tuner(self._peft_model())
        if tuner is None:  # checked before TRL ran; a model swapped afterwards
            raise TypeError("HeftDPOTrainer trains HEFT adapters, but its model holds none.")
        return tuner

    def _prepare_heft(self) -> None:
        """The "ref" adapter (a frozen copy of the starting adapter, interventions applied) and the policy's stage.

        Run after TRL's `__init__` has built the model, and before it precomputes reference log-probs.
        """
        model = self._peft_model()
        tuner = self._heft_tuner()
        if self.ref_model is None:
            if REFERENCE_ADAPTER not in model.peft_config:
                # a new adapter (peft_config=): TRL would use the base model (adapters disabled), which is not where
                # the policy starts (a HEFT adapter's interventions start away from the identity): copy it, as TRL does
                # for a PeftModel
                model.add_adapter(REFERENCE_ADAPTER, model.peft_config[POLICY_ADAPTER])
                for name, param in model.named_parameters():
                    if f".{POLICY_ADAPTER}." in name:
                        target = model.get_parameter(name.replace(f".{POLICY_ADAPTER}.", f".{REFERENCE_ADAPTER}."))
                        target.data.copy_(param.data)
            self._owns_reference = True
            # TRL switches to "ref" with set_adapter: HEFT restores the adapter's recorded stage, which for an added
            # adapter is "lora" (interventions not applied). Record "frozen": both parts applied, nothing trainable.
            model.set_adapter(REFERENCE_ADAPTER)
            tuner.set_stage("frozen")
            model.set_adapter(POLICY_ADAPTER)
        self._apply_heft_stage()

    def _apply_heft_stage(self) -> None:
        """Set the policy adapter's stage (its `requires_grad` flags and whether interventions apply)."""
        model = self._peft_model()
        if model.active_adapter != POLICY_ADAPTER:
            model.set_adapter(POLICY_ADAPTER)
        tuner = self._heft_tuner()
        if self._heft_stage == "lora":
            tuner.set_stage("lora", apply_interventions=True)  # train LoRA under the trained interventions
        else:
            tuner.set_stage(self._heft_stage)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if not getattr(self, "_heft_prepared_for_precompute", False):
            self._heft_prepared_for_precompute = True
            self._prepare_heft()  # the "ref" adapter must exist, frozen with its interventions, before it is used
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def train(self, *args, **kwargs):
        """TRL's `train()`, with the policy in the chosen HEFT stage (whatever changed the flags since `__init__`)."""
        self._apply_heft_stage()
        output = super().train(*args, **kwargs)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._apply_heft_stage()  # loading the best checkpoint's trainable adapter selected the joint stage
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._apply_heft_stage()  # loading a trainable adapter selects the joint stage

    # ------------------------------------------------------------------ saving
    def _save_adapter(self, output_dir: str | None) -> None:
        """Trainer's save of the adapter into `output_dir`, without the `"ref"` copy."""
        super().save_model(output_dir, _internal_call=True)
        folder = os.path.join(output_dir if output_dir is not None else str(self.args.output_dir), REFERENCE_ADAPTER)
        # PeftModel.save_pretrained saves every adapter, the non-default ones in sub-folders: drop the reference copy
        if (
            self._owns_reference
            and self.args.should_save
            and os.path.isfile(os.path.join(folder, "adapter_config.json"))
        ):
            shutil.rmtree(folder, ignore_errors=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the trained HEFT adapter (not the `"ref"` copy) to `output_dir`, replacing an earlier save atomically.

        As `StagedSFTTrainer.save_model` (the same `peft_heft.persistence.save_trainer_output`): written into a staging
        folder in `output_dir`, flushed, then moved over the old files one atomic rename each; the training arguments
        as `training_args.json` (no pickle).
        """
        if _internal_call or not self.args.should_save or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self._save_adapter(output_dir)
        else:
            target = output_dir if output_dir is not None else str(self.args.output_dir)

            def write(staging: str) -> None:
                self._save_adapter(staging)
                self._write_heft_card(staging, model_id=target)  # PEFT's card gets the HEFT section

            save_trainer_output(target, self.args, write)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(  # type: ignore[override]  # TRL's signature, which differs from Trainer's
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """TRL's model card, with its quick start (a plain `pipeline`, which cannot load a HEFT adapter) replaced by
        HEFT's loading code (`import peft_heft` first)."""
        if not self.is_world_process_zero():
            return
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(str(self.args.output_dir), "README.md")
        if not os.path.isfile(path):
            return
        model_id = self.hub_model_id or self.args.hub_model_id or str(self.args.output_dir)
        replace_quick_start(path, model_id)
        self._write_heft_card(str(self.args.output_dir), model_id=model_id, dataset_name=dataset_name)

    def _write_heft_card(self, folder: str, *, model_id: str, dataset_name: str | None = None) -> None:
        """The HEFT section of ``folder/README.md`` for the trained adapter (not the ``"ref"`` copy)."""
        model = self._peft_model()
        update_model_card(
            folder, model.peft_config[model.active_adapter], model_id=model_id, dataset_name=dataset_name
        )


# ---------------------------------------------------------------------- early checks with clear messages
def _check_model(model, ref_model, peft_config) -> None:
    if peft_config is not None and not isinstance(peft_config, HeftConfig):
        raise ValueError(
            f"peft_config must be a HeftConfig for HeftDPOTrainer, got {type(peft_config).__name__}. Pass "
            "peft_config=HeftConfig(...) (every LoraConfig option plus the intervention settings), or use "
            "trl.DPOTrainer for other PEFT methods."
        )
    if isinstance(model, str) or not is_peft_model(model):
        if peft_config is None:
            raise ValueError(
                "HeftDPOTrainer trains a HEFT adapter, but the model has none and no peft_config was given. Load the "
                "adapter to continue from (e.g. a StagedSFTTrainer output) with `PeftModel.from_pretrained(base, "
                "adapter_dir, is_trainable=True)` after `import peft_heft`, or pass peft_config=HeftConfig(...) for "
                "a new adapter."
            )
        return
    if _find_heft_tuner(model) is None:
        peft_type = str(getattr(model.peft_config.get(model.active_adapter), "peft_type", "")).split(".")[-1]
        raise ValueError(
            f"The model is wrapped in a PEFT {peft_type or 'non-HEFT'} adapter, not HEFT. Pass a HEFT PeftModel "
            "(`PeftModel.from_pretrained(base, heft_adapter_dir, is_trainable=True)`), or the base model with "
            "peft_config=HeftConfig(...); use trl.DPOTrainer for other adapters."
        )
    if peft_config is not None:
        raise ValueError(
            "The model is already a HEFT PeftModel and a peft_config was passed too: omit peft_config to train the "
            "model's adapter, or pass the base model (model.get_base_model()) with peft_config for a new one."
        )
    if POLICY_ADAPTER not in model.peft_config or model.active_adapter != POLICY_ADAPTER:
        raise ValueError(
            f"HeftDPOTrainer trains the adapter named {POLICY_ADAPTER!r} (TRL's DPOTrainer copies that one as the "
            f"reference), but the model's active adapter is {model.active_adapter!r} (adapters: "
            f"{sorted(model.peft_config)}). Load the adapter under the default name: "
            "PeftModel.from_pretrained(base, adapter_dir, is_trainable=True) without adapter_name."
        )
    if ref_model is None and REFERENCE_ADAPTER in model.peft_config:
        raise ValueError(
            f"The model already has an adapter named {REFERENCE_ADAPTER!r}, the name HeftDPOTrainer gives the frozen "
            f"copy of the starting adapter (the reference). Remove it first (model.delete_adapter({REFERENCE_ADAPTER!r})"
            "), or pass ref_model=."
        )
    if model.peft_config[POLICY_ADAPTER].inference_mode:
        raise ValueError(
            "The HEFT adapter was loaded for inference (frozen). Load it with "
            "PeftModel.from_pretrained(base, adapter_dir, is_trainable=True) to train it with DPO."
        )


def _check_args(args: DPOConfig) -> None:
    if args.padding_free:
        raise ValueError(
            "padding_free=True is not supported by HeftDPOTrainer: TRL's DPOTrainer (trl 1.16) switches it off "
            "itself and pads every batch anyway (it only warns that padding-free DPO is temporarily unavailable), "
            "so the setting would be silently ignored. Set padding_free=False. (StagedSFTTrainer supports "
            "padding_free=True and packing=True.)"
        )
    if args.sync_ref_model:
        raise ValueError(
            "sync_ref_model=True is not supported by HeftDPOTrainer: the reference is a frozen copy of the starting "
            "HEFT adapter inside the same model, not a separate model to synchronize. Set sync_ref_model=False."
        )
