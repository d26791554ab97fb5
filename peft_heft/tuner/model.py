"""``HeftModel``: PEFT's LoRA tuner plus pyvene-based ReFT interventions on decoder-layer outputs.

This module holds the PEFT lifecycle only (injecting, activating, deleting, unloading adapters; saving and loading
their weights; the ``forward``/``generate`` entry points). The stages live in :mod:`.stages`, the hooks and their
hot path in :mod:`.layer`, the decoder layers, dtypes and devices in :mod:`.placement`, ``generate()``'s pinned
locations in :mod:`.generation`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from torch import nn

from ..settings import INTERVENTION_SETTINGS
from . import generation
from .config import HeftConfig
from .layer import LayerHooks, Routes, adapter_routes, refuse_data_parallel_replica
from .placement import (
    build_adapter_interventions,
    check_intervention_rank,
    keep_4bit_weights_trainable,
    model_dimensions,
    resolve_layers,
)
from .stages import AdapterStages, Stage, check_trainable

INTERVENTIONS_ATTR = "heft_interventions"


class HeftModel(LoraModel):
    """HEFT tuner: LoRA layers from PEFT, plus ReFT interventions applied at prompt positions.

    Created by ``peft.get_peft_model(model, HeftConfig(...))`` after ``import peft_heft``. The LoRA part is PEFT's own
    ``LoraModel`` (every ``LoraConfig`` option works). The interventions live on this tuner in
    ``heft_interventions[adapter_name]`` and act through forward hooks on the decoder layers, so the wrapped model
    keeps the standard Hugging Face forward signature. Interventions go on the prompt tokens of each row: a call
    with ``intervention_locations`` uses them; else ``intervention_prompt_lengths`` (one count per row) or
    ``labels`` (the tokens before the first label != -100) say where the prompt ends; else the whole input is the
    prompt (see :mod:`peft_heft.prompt_tokens`).

    Training is staged with :meth:`set_stage`:

    * ``"lora"``: LoRA trainable, interventions not applied (the default for a new adapter);
    * ``"reft"``: LoRA frozen but applied, interventions applied and trainable;
    * ``"joint"``: both applied and trainable;
    * ``"frozen"``: both applied, nothing trainable (the default for an adapter loaded for inference).

    Args:
        model (`torch.nn.Module`): the base model (PEFT passes it in `get_peft_model`).
        config (`HeftConfig` or `dict[str, HeftConfig]`): the adapter configuration(s).
        adapter_name (`str`): the adapter's name, `"default"` unless given.

    Example:
    ```python
    >>> import peft_heft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_heft.HeftConfig(target_modules=["q_proj", "v_proj"]))
    >>> model.set_stage("lora")   # train LoRA ...
    >>> model.set_stage("reft")   # ... then the interventions on the frozen LoRA-adapted model
    ```
    """

    prefix: str = "lora_"  # LoRA machinery (device placement, delete_adapter) keys on this prefix
    uses_shared_state = True  # interventions live on the tuner: refuse inject_adapter_in_model

    # ------------------------------------------------------------------ construction
    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # Plain attributes may be set before nn.Module.__init__ (run by LoraModel's), which injects the first adapter.
        self._stages = AdapterStages()
        self._hooks = LayerHooks()
        self._hidden_size = self._num_layers = 0
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if INTERVENTIONS_ATTR not in dict(self.named_children()):  # modules can be added once nn.Module.__init__ ran
            self.add_module(INTERVENTIONS_ATTR, nn.ModuleDict())
        config = self.peft_config[adapter_name]
        if not isinstance(config, HeftConfig):
            raise TypeError(f"HeftModel needs a HeftConfig, got {type(config).__name__} for adapter {adapter_name!r}.")
        hidden_size, num_layers = model_dimensions(model)
        _check_base_model_shape(config, hidden_size, num_layers)
        # a 4-bit base stays on bitsandbytes' dequantizing kernel on CPU (its inference kernel cuts gradients)
        keep_4bit_weights_trainable(model)
        layers = resolve_layers(config.intervention_layers, num_layers)
        check_intervention_rank(config.intervention_rank, hidden_size)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        config.base_model_hidden_size = hidden_size
        config.base_model_num_layers = num_layers
        self._hidden_size, self._num_layers = hidden_size, num_layers
        self.heft_interventions[adapter_name] = build_adapter_interventions(
            model, config, layers, hidden_size, self.prefix, autocast_adapter_dtype
        )
        self._install_hooks()
        stage = "frozen" if config.inference_mode else self.stage
        if len(self.peft_config) > 1:
            # another adapter: the active ones keep their stages (those never set get this one)
            self._stages.record_missing(self.active_adapters, Stage.parse(stage))
            self._refresh_routes()
        else:
            self.set_stage(stage)

    def _install_hooks(self) -> None:
        wanted: set[int] = set()
        for name in self.heft_interventions:
            config = cast(HeftConfig, self.peft_config[name])
            wanted.update(resolve_layers(config.intervention_layers, self._num_layers))
        self._hooks.install(self.model, wanted, self._hidden_size)

    def _refresh_routes(self) -> None:
        """Rebuild the active adapters' routes on state changes (stage, active adapter, enable/disable)."""
        self._hooks.routes = self._adapter_routes(self.active_adapters)

    def _adapter_routes(self, adapters: Any, rows: dict[str, list[bool]] | None = None) -> Routes:
        return adapter_routes(
            self._stages, self.peft_config, self.heft_interventions, self._num_layers, adapters, rows
        )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's per-call hooks (LoRA's ``adapter_names=`` mixed batch), plus the same routing for interventions.

        With ``adapter_names=[...]`` (one name per row, ``"__base__"`` for the base model), each row gets the LoRA and
        the interventions of its own adapter, in that adapter's stage, whatever adapter is active; ``"__base__"`` rows
        get none. The routes are this call's (``contextvars``): other calls and threads keep the tuner's.
        """
        adapter_names = kwargs.get("adapter_names")
        refuse_data_parallel_replica(self)
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            if adapter_names is None:
                yield
                return
            names = list(adapter_names)
            num_beams = kwargs.get("num_beams")
            if isinstance(num_beams, int) and num_beams > 1:
                names = [n for n in names for _ in range(num_beams)]  # as PEFT repeats them for LoRA
            used = [n for n in dict.fromkeys(names) if n != "__base__"]
            rows = {adapter: [n == adapter for n in names] for adapter in used}
            with self._hooks.row_routes(self._adapter_routes(used, rows)):
                yield

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> str:
        """The current training stage of the active adapter (see :meth:`set_stage`)."""
        stages = self._stages.active(self)
        return stages[0].name if stages else "lora"

    def _stage_of(self, adapter: str) -> Stage:
        """``adapter``'s stage: recorded, or ``frozen`` if loaded for inference, else ``lora``."""
        return self._stages.of(adapter, self.peft_config.get(adapter))

    def set_stage(self, stage: str, *, apply_interventions: bool | None = None) -> None:
        """Switch the active adapter's training stage in place: which parameters train and whether interventions are
        applied.

        Nothing is copied or moved between devices; only ``requires_grad`` flags and the hook routing change. The stage
        is recorded per adapter: :meth:`set_adapter` restores the stage the adapter it activates was left in (``lora``
        for a new adapter, ``frozen`` for one loaded for inference, ``joint`` for one loaded with
        ``is_trainable=True``).

        Args:
            stage (`str`):
                ``"lora"`` (LoRA trainable, interventions off), ``"reft"`` (LoRA frozen but applied, interventions
                on and trainable), ``"joint"`` (both on and trainable) or ``"frozen"`` (both on, nothing trainable).
            apply_interventions (`bool`, *optional*):
                Override whether interventions are applied in this stage, e.g. ``set_stage("lora",
                apply_interventions=True)`` to train LoRA on top of already-trained interventions (ReFT-then-LoRA).
        """
        parsed = Stage.parse(stage, apply_interventions)
        check_trainable(self, parsed)
        self._stages.record(self.active_adapters, parsed)
        self._stages.apply_requires_grad(self, self.heft_interventions)
        self._refresh_routes()

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._stages.interventions_enabled = True
        # PEFT marks the active LoRA weights trainable: restore the stages' flags
        self._stages.apply_requires_grad(self, self.heft_interventions)
        self._refresh_routes()

    def disable_adapter_layers(self) -> None:
        super().disable_adapter_layers()
        self._stages.interventions_enabled = False
        self._refresh_routes()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter in the stage it was left in (its flags and interventions), see :meth:`set_stage`."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if inference_mode:
            for adapter in self.heft_interventions:
                self.heft_interventions[adapter].requires_grad_(False)
        else:
            self._stages.apply_requires_grad(self, self.heft_interventions)
        self._refresh_routes()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """PEFT's ``set_requires_grad``: the adapter's LoRA weights *and* interventions. The stage is not changed: the
        next :meth:`set_stage` or :meth:`set_adapter` sets the flags from the stage again."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        for adapter in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if adapter in self.heft_interventions:
                self.heft_interventions[adapter].requires_grad_(requires_grad)

    def _loaded_for_training(self, adapter_name: str) -> None:
        """An adapter loaded with ``is_trainable=True`` continues training both parts (``joint``)."""
        if adapter_name in self.active_adapters:
            self.set_stage("joint")
        else:
            self._stages.record([adapter_name], Stage("joint", True))

    # ------------------------------------------------------------------ adapters
    def replace_interventions(self, adapter_name: str = "default", **settings: Any) -> None:
        """Rebuild one adapter's ReFT interventions with new intervention settings; its LoRA weights are untouched.

        The new settings are validated exactly as :class:`HeftConfig` validates them, then against this model (layers
        in range, rank at most the hidden size), before anything changes: a refused call leaves the adapter as it was.
        The new interventions are freshly initialized (from torch's RNG, like a new adapter's), placed on the
        decoder layers' devices, and trainable according to the adapter's current stage; hooks and routes are
        refreshed. The adapter's ``peft_config`` gets the new settings, so ``save_pretrained``/``from_pretrained``
        round-trip them. Used by ``run_fine_stage_search`` to try fine-stage settings on one coarse stage.

        Args:
            adapter_name (`str`, defaults to `"default"`): the HEFT adapter whose interventions are replaced.
            **settings: any of ``intervention_layers``, ``intervention_type``, ``intervention_rank``,
                ``intervention_positions``, ``intervention_component``, ``share_intervention_weights``,
                ``intervention_dropout``, ``intervention_act_fn``, ``intervention_add_bias``; the others keep their
                values.

        Example:
            ```py
            >>> model.base_model.replace_interventions("default", intervention_layers=[1], intervention_rank=2,
            ...                                        intervention_positions="f3+l3")
            ```
        """
        if adapter_name not in self.peft_config or adapter_name not in self.heft_interventions:
            raise ValueError(
                f"Adapter {adapter_name!r} is not a HEFT adapter of this model; its adapters are "
                f"{sorted(self.peft_config)}."
            )
        unknown = sorted(set(settings) - set(INTERVENTION_SETTINGS))
        if unknown:
            raise ValueError(
                f"replace_interventions() changes intervention settings only; {unknown} are not among them. Use one "
                f"of {list(INTERVENTION_SETTINGS)} (LoRA settings need a new adapter)."
            )
        old = cast(HeftConfig, self.peft_config[adapter_name])
        new = dataclasses.replace(old, **settings)  # HeftConfig.__post_init__: the config's own validation
        new.base_model_hidden_size, new.base_model_num_layers = old.base_model_hidden_size, old.base_model_num_layers
        layers = resolve_layers(new.intervention_layers, self._num_layers)
        check_intervention_rank(new.intervention_rank, self._hidden_size)
        previous = self.heft_interventions[adapter_name]
        autocast = any(p.dtype == torch.float32 for p in previous.parameters()) if len(previous) else True
        self.heft_interventions[adapter_name] = build_adapter_interventions(
            self.model, new, layers, self._hidden_size, self.prefix, autocast
        )
        self.peft_config[adapter_name] = new
        self._stages.apply_requires_grad(self, self.heft_interventions)
        self._install_hooks()
        self._refresh_routes()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.heft_interventions:
            del self.heft_interventions[adapter_name]
        self._stages.forget(adapter_name)
        self._install_hooks()
        self._refresh_routes()

    def add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs) -> None:
        """Refused for HEFT adapters (before anything is built): their interventions cannot be combined by weight."""
        raise ValueError(
            f"add_weighted_adapter() cannot combine HEFT adapters ({', '.join(map(repr, adapters))} into "
            f"{adapter_name!r}): a ReFT intervention h + R^T(W h + b - R h) is not linear in its orthonormal rotation "
            "R, so a weighted sum of the adapters' weights is neither orthonormal nor any weighted combination of "
            "their effects, and building the new adapter's interventions at random (as PEFT's LoRA path would) "
            "gives an adapter that saves and reloads but was never trained. Run several adapters in one batch with "
            "`model(..., adapter_names=[...])` (one adapter per row), or train a new adapter; nothing was added."
        )

    # ------------------------------------------------------------------ entry points
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` with interventions on the prompt positions.

        Locations are computed once from the prompt (or taken from ``intervention_locations``, or from the first
        ``intervention_prompt_lengths[i]`` real tokens of each row) and pinned for the whole call, in this call's own
        context (concurrent calls in other threads do not see them). Prompt positions are intervened during prefill
        (also when it is chunked) and reach new tokens through the KV cache; with ``use_cache=False`` every step
        recomputes the prompt with the same interventions, so both give the same tokens. Beam search and
        ``num_return_sequences`` repeat the locations per row. Without an ``attention_mask``, the mask is inferred
        from ``pad_token_id`` exactly as transformers infers it, and passed on, so padding is never intervened on.
        """
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        try:
            return generation.generate(id(self._hooks), self._hooks.routes, self.model, *args, **kwargs)
        except IndexError as error:  # only on failure: the common path pays nothing for the clearer message
            explained = _out_of_vocabulary(self.model, ids)
            if explained is None:
                raise
            raise explained from error

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)
        except IndexError as error:  # only on failure: the common path pays nothing for the clearer message
            ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            explained = _out_of_vocabulary(self.model, ids)
            if explained is None:
                raise
            raise explained from error

    # ------------------------------------------------------------------ merge / unload
    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        self._drop_interventions(merge=True, adapter_names=adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        self._drop_interventions(merge=False, adapter_names=None)
        return super().unload()

    def _drop_interventions(self, merge: bool, adapter_names: list[str] | None) -> None:
        """Remove the hooks and interventions before PEFT unloads LoRA; refuse to merge applied interventions."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        ours = any(n in self.heft_interventions for n in names)
        if merge and ours and any(s.apply_interventions for s in self._stages.active(self)):
            raise ValueError(
                "merge_and_unload() cannot fold HEFT's ReFT interventions into the weights: they act on hidden "
                "states at specific token positions, not on weights. Use `model.merge_adapter()` to fold LoRA into "
                "the base weights in place while keeping the interventions (same outputs, faster), or "
                "`model.unload()` to get the untouched base model back."
            )
        if merge and ours:
            warnings.warn(
                "merge_and_unload(): the HEFT interventions are not applied in the 'lora' stage and are dropped; "
                "only LoRA is merged into the returned model.",
                stacklevel=3,
            )
        self._hooks.remove()
        for name in list(self.heft_interventions):
            del self.heft_interventions[name]
        self._hooks.routes = {}

    # ------------------------------------------------------------------ state dict (save / load)
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{INTERVENTIONS_ATTR}.{adapter_name}."
        head, found, tail = key.partition(marker)
        if found:
            return f"{head}{INTERVENTIONS_ATTR}.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = _find_heft_tuner(model)
        if tuner is not None and adapter_name in tuner.heft_interventions:
            _check_interventions_saved(tuner.heft_interventions[adapter_name], adapter_name, to_return)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        own = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        _check_checkpoint_matches(cls, config, adapter_name, remapped, own)
        tuner = _find_heft_tuner(model)
        if tuner is not None and not config.inference_mode:
            # a loaded adapter applies both parts; training continues on both until set_stage() says otherwise
            tuner._loaded_for_training(adapter_name)
        return remapped


def _check_base_model_shape(config: HeftConfig, hidden_size: int, num_layers: int) -> None:
    expected = (config.base_model_hidden_size, config.base_model_num_layers)
    if expected == (None, None) or expected == (hidden_size, num_layers):
        return
    raise ValueError(
        f"This HEFT adapter was made for a model with hidden size {expected[0]} and {expected[1]} decoder layers "
        f"(base_model_name_or_path={config.base_model_name_or_path!r}), but the model it is being put on has "
        f"hidden size {hidden_size} and {num_layers} layers. Load the adapter onto the base model it was trained "
        "with."
    )


def _check_interventions_saved(interventions: nn.ModuleDict, adapter_name: str, to_save: dict[str, Any]) -> None:
    """Every intervention weight is among the tensors to save (an intervention overriding state_dict() drops them)."""
    expected = {n for n, _ in interventions.named_parameters()}
    marker = f"{INTERVENTIONS_ATTR}.{adapter_name}."
    saved = {k.partition(marker)[2] for k in to_save if marker in k}
    missing = expected - saved
    if missing:
        raise ValueError(
            f"Cannot save adapter {adapter_name!r}: the intervention weights {sorted(missing)[:4]} do not "
            "appear in the model's state_dict. An intervention class that overrides state_dict() (as "
            "pyreft's do) cannot be saved through PEFT; use the peft_heft intervention classes or a subclass "
            "without that override."
        )


def _check_checkpoint_matches(
    tuner_cls: type[HeftModel],
    config: HeftConfig,
    adapter_name: str,
    remapped: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
) -> None:
    """The loaded tensors are exactly the adapter's own (``own``: the model's LoRA and intervention tensors of
    ``adapter_name``), each of its shape: nothing is left at random initialization, nothing is dropped."""
    expected = set(own)
    markers = (f"{INTERVENTIONS_ATTR}.", tuner_cls.prefix)
    missing = sorted(k for k in expected if k not in remapped)
    unexpected = sorted(k for k in remapped if any(m in k for m in markers) and k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            # named as adapter_model.safetensors names them (no adapter name), every one of them up to 20
            names = [tuner_cls._remove_adapter_name_from_key(k, adapter_name) for k in missing]
            more = f" and {len(names) - 20} more" if len(names) > 20 else ""
            parts.append(f"missing {len(missing)} weight(s) from the file: {', '.join(names[:20])}{more}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected LoRA or intervention weight(s), e.g. {unexpected[:3]}")
        raise ValueError(
            f"The HEFT adapter checkpoint does not match adapter {adapter_name!r} built from its config: "
            + "; ".join(parts)
            + ". The adapter file is incomplete, has extra tensors, or belongs to a different configuration "
            "(target_modules, layers_to_transform, intervention_layers or positions edited?); nothing was loaded "
            "at random and nothing was dropped."
        )
    wrong = [(k, tuple(remapped[k].shape), tuple(own[k].shape)) for k in sorted(expected) if k in remapped]
    wrong = [item for item in wrong if item[1] != item[2]]
    if wrong:
        key, got, want = wrong[0]
        raise ValueError(
            f"The HEFT adapter checkpoint has {len(wrong)} tensor(s) of another shape than adapter "
            f"{adapter_name!r} built from its config, e.g. {key}: {got} in the file, {want} from the config "
            f"(r={config.r}, intervention_rank={config.intervention_rank}). adapter_config.json's r, rank_pattern "
            "or intervention_rank was edited, or the weights belong to another adapter: restore the config that "
            "was saved with these weights."
        )


def _out_of_vocabulary(model: nn.Module, input_ids: torch.Tensor | None) -> ValueError | None:
    """A clear error when ``input_ids`` hold ids the input embeddings do not have (torch only says ``IndexError:
    index out of range in self``); None when that is not why the forward failed."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    size = getattr(embeddings, "num_embeddings", None)
    if size is None or not isinstance(input_ids, torch.Tensor) or input_ids.numel() == 0:
        return None
    low, high = int(input_ids.min()), int(input_ids.max())
    if 0 <= low and high < size:
        return None
    return ValueError(
        f"input_ids hold token ids outside the model's vocabulary: ids from {low} to {high}, but the input embeddings "
        f"have {size} rows (ids 0 to {size - 1}). Tokenize with the base model's own tokenizer; after adding tokens "
        "to a tokenizer, call base_model.resize_token_embeddings(len(tokenizer)) before get_peft_model; and never "
        "feed labels (-100) as input_ids."
    )


def _find_heft_tuner(model: Any) -> HeftModel | None:
    """The HEFT tuner of a ``PeftModel`` (or the tuner itself); ``None`` for any other model."""
    if isinstance(model, HeftModel):
        return model
    base = getattr(model, "base_model", None)
    return base if isinstance(base, HeftModel) else None
