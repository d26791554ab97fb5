"""``HeftModel``: PEFT's LoRA tuner plus pyvene-based ReFT interventions on decoder-layer outputs."""

from __future__ import annotations

import functools
import warnings
from typing import Any, cast

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from torch import nn

from .config import HeftConfig
from .hooks import ForwardPlan, intervene, locate
from .interventions import build_intervention
from .layers import find_decoder_layers, model_dimensions, resolve_layers
from .positions import compute_locations, normalize_locations

INTERVENTIONS_ATTR = "heft_interventions"
STAGES = ("lora", "reft", "joint", "frozen")


def _intervention_key(layer: int, group: int, num_groups: int) -> str:
    if num_groups == 1:
        return f"layer{layer}"
    return f"layer{layer}_{('first', 'last')[group]}"


def _past_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    get_seq_length = getattr(past_key_values, "get_seq_length", None)
    if callable(get_seq_length):
        return int(get_seq_length())
    return int(past_key_values[0][0].shape[-2])  # legacy tuple cache


class HeftModel(LoraModel):
    """HEFT tuner: LoRA layers from PEFT, plus ReFT interventions applied at prompt positions.

    Created by ``peft.get_peft_model(model, HeftConfig(...))`` after ``import peft_heft``. The LoRA part is PEFT's own
    ``LoraModel`` (every ``LoraConfig`` option works). The interventions live on this tuner in
    ``heft_interventions[adapter_name]`` and act through forward hooks on the decoder layers, so the wrapped model
    keeps the standard Hugging Face forward signature; ``intervention_locations`` may be passed to ``forward`` and
    ``generate`` to override the positions derived from the attention mask.

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
        self._init_heft_state()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _init_heft_state(self) -> None:
        object.__setattr__(self, "_heft_ready", False)

    def _ensure_heft_state(self) -> None:
        if self._heft_ready:
            return
        self.add_module(INTERVENTIONS_ATTR, nn.ModuleDict())
        self._layer_hooks: dict[int, Any] = {}
        self._pre_hook = None
        self._plan: ForwardPlan | None = None
        self._pinned: dict | None = None
        self._pinned_last = -1
        self._stage = "lora"
        self._apply_interventions = False
        self._interventions_enabled = True
        self._routes: dict[int, list[tuple[tuple, list[nn.Module]]]] = {}
        object.__setattr__(self, "_heft_ready", True)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._ensure_heft_state()
        config = self.peft_config[adapter_name]
        if not isinstance(config, HeftConfig):
            raise TypeError(f"HeftModel needs a HeftConfig, got {type(config).__name__} for adapter {adapter_name!r}.")
        hidden_size, num_layers = model_dimensions(model)
        self._check_base_model_shape(config, hidden_size, num_layers)
        layers = resolve_layers(config.intervention_layers, num_layers)
        if config.intervention_rank > hidden_size:
            raise ValueError(
                f"intervention_rank={config.intervention_rank} is larger than the model's hidden size {hidden_size}; "
                f"use a rank <= {hidden_size}."
            )
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
        self._add_interventions(model, adapter_name, config, layers, hidden_size, autocast_adapter_dtype)
        self._install_hooks()
        if config.inference_mode:
            self._stage, self._apply_interventions = "frozen", True
        self.set_stage(self._stage, _only_refresh=len(self.peft_config) > 1)

    @staticmethod
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

    def _add_interventions(self, model, adapter_name, config, layers, hidden_size, autocast_adapter_dtype) -> None:
        _, decoder_layers = find_decoder_layers(model)
        groups = config.num_position_groups
        modules = nn.ModuleDict()
        for layer in layers:
            # a base weight, not an adapter weight (those are on "meta" with low_cpu_mem_usage)
            reference = next(p for n, p in decoder_layers[layer].named_parameters() if self.prefix not in n)
            dtype = reference.dtype
            if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32  # like PEFT's LoRA: train adapters in float32 on half-precision bases
            device = None if reference.device.type == "meta" else reference.device
            for group in range(groups):
                modules[_intervention_key(layer, group, groups)] = build_intervention(
                    config.intervention_type,
                    hidden_size=hidden_size,
                    rank=config.intervention_rank,
                    dropout=config.intervention_dropout,
                    dtype=dtype,
                    device=device,
                    act_fn=config.intervention_act_fn,
                    add_bias=config.intervention_add_bias,
                )
        self.heft_interventions[adapter_name] = modules

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        _, decoder_layers = find_decoder_layers(self.model)
        wanted = set()
        for name in self.heft_interventions:
            config = cast(HeftConfig, self.peft_config[name])
            wanted.update(resolve_layers(config.intervention_layers, len(decoder_layers)))
        for layer in sorted(wanted - set(self._layer_hooks)):
            # functools.partial of a bound method: survives copy.deepcopy pointing at the copy, unlike a closure
            self._layer_hooks[layer] = decoder_layers[layer].register_forward_hook(
                functools.partial(self._layer_output_hook, layer)
            )
        for layer in set(self._layer_hooks) - wanted:
            self._layer_hooks.pop(layer).remove()
        if wanted and self._pre_hook is None:
            self._pre_hook = self.model.register_forward_pre_hook(self._plan_forward_hook, with_kwargs=True)
        elif not wanted and self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def _remove_hooks(self) -> None:
        for handle in self._layer_hooks.values():
            handle.remove()
        self._layer_hooks.clear()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        self._plan = None

    def _refresh_routes(self) -> None:
        """Per decoder layer: which interventions run, and with which position spec. Rebuilt on state changes."""
        routes: dict[int, list[tuple[tuple, list[nn.Module]]]] = {}
        if self._apply_interventions and self._interventions_enabled:
            for adapter in self.active_adapters:
                if adapter not in self.heft_interventions:
                    continue
                config = cast(HeftConfig, self.peft_config[adapter])
                groups = config.num_position_groups
                key = (config.position_spec, config.share_intervention_weights)
                for layer in resolve_layers(config.intervention_layers, self._num_layers):
                    mods = [
                        self.heft_interventions[adapter][_intervention_key(layer, g, groups)] for g in range(groups)
                    ]
                    routes.setdefault(layer, []).append((key, mods))
        self._routes = routes

    def _plan_forward_hook(self, module, args, kwargs):
        """Forward pre-hook on the wrapped model: compute where to intervene in this call."""
        explicit = kwargs.pop("intervention_locations", None)
        if not self._routes:
            self._plan = None
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        if shaped is None:
            self._plan = None
            return args, kwargs
        batch, seq_len = shaped.shape[0], shaped.shape[1]
        offset = _past_length(kwargs.get("past_key_values"))
        if self._pinned is not None and offset > self._pinned_last:
            self._plan = None  # a decoding step past the prompt: nothing to intervene on, no work
            return args, kwargs
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            mask = None  # a custom 4D mask: we cannot read padding from it
        pinned = self._pinned
        absolute = self._pinned_locations(pinned, batch) if pinned is not None else None
        if absolute is None:
            absolute = self._locations(batch, offset + seq_len, mask, explicit, shaped.device)
        located = {key: locate(locs, offset, seq_len, self._hidden_size) for key, locs in absolute.items()}
        plan = ForwardPlan()
        for layer, entries in self._routes.items():
            kept = [(located[key], mods) for key, mods in entries if located[key] is not None]
            if kept:
                plan.routes[layer] = kept
        self._plan = plan if plan.routes else None
        return args, kwargs

    def _locations(self, batch, total_len, mask, explicit, device) -> dict[tuple, torch.Tensor]:
        """Absolute locations ``(B, G, n)`` per position spec in use, from the mask or the explicit tensor."""
        if mask is not None and tuple(mask.shape) != (batch, total_len):
            mask = None  # e.g. a mask for a different length: treat every token as real
        result = {}
        for entries in self._routes.values():
            for key, _ in entries:
                if key in result:
                    continue
                spec, share = key
                if explicit is not None:
                    locs = normalize_locations(explicit, batch, spec.num_groups(share), device)
                    if int(locs.max()) >= total_len:
                        raise ValueError(
                            f"intervention_locations contains position {int(locs.max())}, but the sequence has "
                            f"{total_len} tokens."
                        )
                    result[key] = locs
                else:
                    result[key] = compute_locations(spec, mask, batch, total_len, share, device)
        return result

    @staticmethod
    def _pinned_locations(pinned: dict[tuple, torch.Tensor], batch: int) -> dict[tuple, torch.Tensor]:
        out = {}
        for key, locs in pinned.items():
            if locs.shape[0] != batch:
                if batch % locs.shape[0]:
                    raise ValueError(
                        f"generate() ran a batch of {batch} rows for {locs.shape[0]} prompts; cannot map the "
                        "intervention locations onto it."
                    )
                locs = locs.repeat_interleave(batch // locs.shape[0], dim=0)  # beam search / num_return_sequences
                pinned[key] = locs
            out[key] = locs
        return out

    def _layer_output_hook(self, layer: int, module, args, output):
        plan = self._plan
        if plan is None:
            return None
        entries = plan.routes.get(layer)
        if entries is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        for located, mods in entries:
            hidden = intervene(hidden, located, mods)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> str:
        """The current training stage (see :meth:`set_stage`)."""
        return self._stage

    def set_stage(self, stage: str, *, apply_interventions: bool | None = None, _only_refresh: bool = False) -> None:
        """Switch the training stage in place: which parameters train and whether interventions are applied.

        Nothing is copied or moved between devices; only ``requires_grad`` flags and the hook routing change.

        Args:
            stage (`str`):
                ``"lora"`` (LoRA trainable, interventions off), ``"reft"`` (LoRA frozen but applied, interventions
                on and trainable), ``"joint"`` (both on and trainable) or ``"frozen"`` (both on, nothing trainable).
            apply_interventions (`bool`, *optional*):
                Override whether interventions are applied in this stage, e.g. ``set_stage("lora",
                apply_interventions=True)`` to train LoRA on top of already-trained interventions (ReFT-then-LoRA).
        """
        if stage not in STAGES:
            raise ValueError(f"Unknown HEFT stage {stage!r}; use one of {STAGES}.")
        lora_trainable = stage in ("lora", "joint")
        reft_trainable = stage in ("reft", "joint")
        if not _only_refresh:
            for adapter in self.active_adapters:
                config = self.peft_config[adapter]
                if config.inference_mode and (lora_trainable or reft_trainable):
                    raise ValueError(
                        f"Adapter {adapter!r} was loaded for inference; load it with is_trainable=True to train stage "
                        f"{stage!r}."
                    )
            for adapter in self.peft_config:
                active = adapter in self.active_adapters
                self.set_requires_grad(adapter, requires_grad=active and lora_trainable)
                if adapter in self.heft_interventions:
                    self.heft_interventions[adapter].requires_grad_(active and reft_trainable)
        self._stage = stage
        self._apply_interventions = stage != "lora" if apply_interventions is None else bool(apply_interventions)
        self._refresh_routes()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if self._heft_ready:
            self._interventions_enabled = enabled
            # PEFT's enable_adapters(True) marks the active LoRA weights trainable: restore the stage's flags
            self.set_stage(self._stage, apply_interventions=self._apply_interventions, _only_refresh=not enabled)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if self._heft_ready:
            for adapter in self.heft_interventions:
                self.heft_interventions[adapter].requires_grad_(False)
            if not inference_mode:
                self.set_stage(self._stage, apply_interventions=self._apply_interventions)
            else:
                self._refresh_routes()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.heft_interventions:
            del self.heft_interventions[adapter_name]
        self._install_hooks()
        self._refresh_routes()

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """``generate`` with interventions on the prompt positions.

        Locations are computed once from the prompt (or taken from ``intervention_locations``) and pinned for the
        whole call. Prompt positions are intervened during prefill and reach new tokens through the KV cache; with
        ``use_cache=False`` every step recomputes the prompt with the same interventions, so both give the same
        tokens. Beam search and ``num_return_sequences`` repeat the locations per row.
        """
        explicit = kwargs.pop("intervention_locations", None)
        if not self._routes:
            return self.model.generate(*args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if shaped is None:
            raise ValueError("HEFT generate() needs input_ids or inputs_embeds to place the prompt interventions.")
        mask = kwargs.get("attention_mask")
        self._pinned = self._locations(shaped.shape[0], shaped.shape[1], mask, explicit, shaped.device)
        self._pinned_last = max(int(locs.max()) for locs in self._pinned.values())
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._pinned = None

    # ------------------------------------------------------------------ merge / unload
    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if self._heft_ready:
            names = adapter_names if adapter_names is not None else self.active_adapters
            if merge and self._apply_interventions and any(n in self.heft_interventions for n in names):
                raise ValueError(
                    "merge_and_unload() cannot fold HEFT's ReFT interventions into the weights: they act on hidden "
                    "states at specific token positions, not on weights. Use `model.merge_adapter()` to fold LoRA into "
                    "the base weights in place while keeping the interventions (same outputs, faster), or "
                    "`model.unload()` to get the untouched base model back."
                )
            if merge and any(n in self.heft_interventions for n in names):
                warnings.warn(
                    "merge_and_unload(): the HEFT interventions are not applied in the 'lora' stage and are dropped; "
                    "only LoRA is merged into the returned model.",
                    stacklevel=3,
                )
            self._remove_hooks()
            for name in list(self.heft_interventions):
                del self.heft_interventions[name]
            self._routes = {}
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

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
            expected = {n for n, _ in tuner.heft_interventions[adapter_name].named_parameters()}
            marker = f"{INTERVENTIONS_ATTR}.{adapter_name}."
            saved = {k.partition(marker)[2] for k in to_return if marker in k}
            missing = expected - saved
            if missing:
                raise ValueError(
                    f"Cannot save adapter {adapter_name!r}: the intervention weights {sorted(missing)[:4]} do not "
                    "appear in the model's state_dict. An intervention class that overrides state_dict() (as "
                    "pyreft's do) cannot be saved through PEFT; use the peft_heft intervention classes or a subclass "
                    "without that override."
                )
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = set(_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes))
        marker = f"{INTERVENTIONS_ATTR}."
        missing = sorted(k for k in expected if k not in remapped)
        unexpected = sorted(k for k in remapped if marker in k and k not in expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} weight(s), e.g. {missing[:3]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected intervention weight(s), e.g. {unexpected[:3]}")
            raise ValueError(
                f"The HEFT adapter checkpoint does not match adapter {adapter_name!r} built from its config: "
                + "; ".join(parts)
                + ". The adapter file is incomplete or belongs to a different configuration; nothing was loaded "
                "at random."
            )
        tuner = _find_heft_tuner(model)
        if tuner is not None and not config.inference_mode and adapter_name in tuner.active_adapters:
            # a loaded adapter applies both parts; training continues on both until set_stage() says otherwise
            tuner.set_stage("joint")
        return remapped


def _find_heft_tuner(model) -> HeftModel | None:
    if isinstance(model, HeftModel):
        return model
    base = getattr(model, "base_model", None)
    return base if isinstance(base, HeftModel) else None
