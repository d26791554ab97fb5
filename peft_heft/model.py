"""``HeftModel``: PEFT's LoRA tuner plus pyvene-based ReFT interventions on decoder-layer outputs."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from contextlib import contextmanager
from typing import Any, cast

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from . import call_state
from .call_state import UNSET, GenerationState
from .config import HeftConfig
from .hooks import ForwardPlan, intervene, locate
from .interventions import build_intervention
from .layers import find_decoder_layers, model_dimensions, resolve_layers
from .positions import compute_locations, normalize_locations
from .prompt_tokens import PROMPT_LENGTHS_KWARG, PromptHint, refuse_lm_eval_call, warn_once
from .quantized_base import keep_4bit_weights_trainable

INTERVENTIONS_ATTR = "heft_interventions"
STAGES = ("lora", "reft", "joint", "frozen")
# The HeftConfig fields that only shape the ReFT interventions: what replace_interventions() may change.
INTERVENTION_SETTINGS = (
    "intervention_layers",
    "intervention_type",
    "intervention_rank",
    "intervention_positions",
    "intervention_component",
    "share_intervention_weights",
    "intervention_dropout",
    "intervention_act_fn",
    "intervention_add_bias",
)


def _intervention_key(layer: int, group: int, num_groups: int) -> str:
    if num_groups == 1:
        return f"layer{layer}"
    return f"layer{layer}_{('first', 'last')[group]}"


def _find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The ``transformers.Cache`` among a forward's inputs, whatever keyword carries it (``past_key_values``, ``cache``
    in transformers >= 5.24, ...); ``None`` without one."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def _cache_length(cache: Cache | None) -> int | None:
    """Tokens already in ``cache`` (0 without one), asked the public way (``get_seq_length(layer_idx)``) at its first
    attention layer; ``None`` when the cache cannot say.

    ``get_seq_length()`` asks layer 0. On hybrid models (Qwen3-Next: linear-attention layers, then full attention)
    layer 0 is a linear-attention layer: transformers 5.24 redirected the question to the first attention layer,
    5.25 answers with the linear layer's own count, a 0-dim tensor. An attention layer (``CacheLayerMixin``) of a
    dynamic cache answers with its keys' shape, a Python int (no host sync); a static layer's answer is a tensor,
    converted here (a host sync), as is the count of a cache with no attention layer at all (Mamba), which only
    transformers >= 5.25 keeps (``None`` before). This runs once per planned forward: ``generate()``'s decoding steps
    do not get here (``GenerationState.prompt_done``), so they never read the cache.
    """
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return int(cache.get_seq_length())  # not a list of layers (EncoderDecoderCache...): the cache's own answer
    index = next((i for i, layer in enumerate(layers) if isinstance(layer, CacheLayerMixin)), None)
    if index is not None:
        return int(cache.get_seq_length(index))
    try:
        if not layers or not cache.has_previous_state():
            return 0  # no layers yet, or linear-attention / state-space layers that hold no state yet
        return int(cache.get_seq_length(0))  # such layers only: their own count (transformers >= 5.25)
    except (ValueError, AttributeError):
        return None  # they keep no count (transformers 5.24), or the layers are of a kind not known here


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
        self._init_heft_state()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _init_heft_state(self) -> None:
        object.__setattr__(self, "_heft_ready", False)

    def _ensure_heft_state(self) -> None:
        if self._heft_ready:
            return
        self.add_module(INTERVENTIONS_ATTR, nn.ModuleDict())
        self._layer_hooks: dict[int, Any] = {}
        self._call_hooks: list[Any] = []  # the causal-LM wrapper's and the backbone's hooks, set together
        self._grad_plan: ForwardPlan | None = None  # for checkpointed layers recomputed in another thread
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
        # a 4-bit base stays on bitsandbytes' dequantizing kernel on CPU (its inference kernel cuts gradients)
        keep_4bit_weights_trainable(model)
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
            dtype = _compute_dtype(model, decoder_layers[layer], self.prefix)
            if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32  # like PEFT's LoRA: train adapters in float32 on half-precision bases
            device = _execution_device(model, decoder_layers[layer], self.prefix)
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
        if wanted and not self._call_hooks:
            # The wrapper takes `intervention_locations` out of the call (transformers does not know them); the plan
            # is made where the decoder layers' inputs are known, on the backbone that holds them, so that a call of
            # the backbone alone (a task head, a user) is planned too.
            backbone = self._backbone()
            self._call_hooks = [
                self.model.register_forward_pre_hook(self._take_explicit_locations_hook, with_kwargs=True),
                self.model.register_forward_hook(self._clear_explicit_locations_hook, always_call=True),
                backbone.register_forward_pre_hook(self._plan_forward_hook, with_kwargs=True),
            ]
        elif not wanted and self._call_hooks:
            self._remove_call_hooks()

    def _backbone(self) -> nn.Module:
        name, _ = find_decoder_layers(self.model)
        parent = name.rpartition(".")[0]
        return self.model.get_submodule(parent) if parent else self.model

    def _remove_call_hooks(self) -> None:
        for handle in self._call_hooks:
            handle.remove()
        self._call_hooks = []

    def _remove_hooks(self) -> None:
        for handle in self._layer_hooks.values():
            handle.remove()
        self._layer_hooks.clear()
        self._remove_call_hooks()
        self._grad_plan = None
        call_state.set_plan(id(self), UNSET)

    @property
    def _routes(self) -> dict[int, list[tuple[tuple, list[nn.Module]]]]:
        """Per decoder layer: which interventions run, and with which position spec.

        The tuner's routes (rebuilt by :meth:`_refresh_routes` on state changes), unless this call passed
        ``adapter_names=`` (PEFT's mixed batch): then the routes of that call, which apply each row's own adapter's
        interventions to that row only (:meth:`_enable_peft_forward_hooks`), held in this call's context.
        """
        per_call = call_state.row_routes(id(self))
        return self.__dict__["_shared_routes"] if per_call is None else per_call

    @_routes.setter
    def _routes(self, routes: dict[int, list[tuple[tuple, list[nn.Module]]]]) -> None:
        self.__dict__["_shared_routes"] = routes

    def _adapter_routes(self, adapters, rows: dict[str, list[bool]] | None = None):
        """Routes of ``adapters`` (each adapter's interventions only if its stage applies them); with ``rows``, each
        adapter's interventions are restricted to its rows of the batch."""
        routes: dict[int, list[tuple[tuple, list[nn.Module]]]] = {}
        if not self._interventions_enabled:
            return routes
        for adapter in adapters:
            if adapter not in self.heft_interventions or not self._stage_of(adapter)[1]:
                continue
            config = cast(HeftConfig, self.peft_config[adapter])
            groups = config.num_position_groups
            key = (config.position_spec, config.share_intervention_weights)
            for layer in resolve_layers(config.intervention_layers, self._num_layers):
                mods: list[nn.Module] = [
                    self.heft_interventions[adapter][_intervention_key(layer, g, groups)] for g in range(groups)
                ]
                if rows is not None:
                    mods = [_RowSubset(m, adapter, rows[adapter]) for m in mods]
                routes.setdefault(layer, []).append((key, mods))
        return routes

    def _refresh_routes(self) -> None:
        """Rebuild the active adapters' routes on state changes (stage, active adapter, enable/disable)."""
        self._routes = self._adapter_routes(self.active_adapters)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's per-call hooks (LoRA's ``adapter_names=`` mixed batch), plus the same routing for interventions.

        With ``adapter_names=[...]`` (one name per row, ``"__base__"`` for the base model), each row gets the LoRA and
        the interventions of its own adapter, in that adapter's stage, whatever adapter is active; ``"__base__"`` rows
        get none. The routes are this call's (``contextvars``): other calls and threads keep the tuner's.
        """
        adapter_names = kwargs.get("adapter_names")
        if self._heft_ready:
            _refuse_data_parallel_replica(self)
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            if adapter_names is None or not self._heft_ready:
                yield
                return
            names = list(adapter_names)
            num_beams = kwargs.get("num_beams")
            if isinstance(num_beams, int) and num_beams > 1:
                names = [n for n in names for _ in range(num_beams)]  # as PEFT repeats them for LoRA
            used = [n for n in dict.fromkeys(names) if n != "__base__"]
            rows = {adapter: [n == adapter for n in names] for adapter in used}
            token = call_state.start_row_routes(id(self), self._adapter_routes(used, rows))
            try:
                yield
            finally:
                call_state.end_row_routes(token)

    def _take_explicit_locations_hook(self, module, args, kwargs):
        """Forward pre-hook on the wrapped model: take ``intervention_locations`` out of this call's inputs."""
        explicit = kwargs.pop("intervention_locations", None)
        lengths = kwargs.pop(PROMPT_LENGTHS_KWARG, None)
        if explicit is not None and lengths is not None:
            raise ValueError(
                f"Pass either intervention_locations or {PROMPT_LENGTHS_KWARG} to a HEFT model call, not both: the "
                "locations already say where the interventions go."
            )
        if explicit is None:
            labels = kwargs.get("labels")
            if lengths is not None:
                explicit = PromptHint(prompt_lengths=torch.as_tensor(lengths))
            elif isinstance(labels, torch.Tensor) and labels.dim() == 2:
                explicit = PromptHint(labels=labels)
        call_state.set_explicit_locations(id(self), explicit if explicit is not None else UNSET)
        return args, kwargs

    def _clear_explicit_locations_hook(self, module, args, output):
        call_state.set_explicit_locations(id(self), UNSET)

    def _plan_forward_hook(self, module, args, kwargs):
        """Forward pre-hook on the backbone: compute where the decoder layers intervene in this call."""
        owner = id(self)
        if not self._routes:
            call_state.set_plan(owner, None)
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        if shaped is None:
            call_state.set_plan(owner, None)
            return args, kwargs
        batch, seq_len = int(shaped.shape[0]), int(shaped.shape[1])
        if batch == 0 or seq_len == 0:
            raise ValueError(
                f"The HEFT model got an input of shape {tuple(shaped.shape)}: {'no rows' if batch == 0 else 'no tokens'}"
                ". Pass at least one row with at least one token (check the tokenizer output or the data collator)."
            )
        generation = call_state.generation_state(owner)
        if generation is not None and generation.prompt_done:
            call_state.set_plan(owner, None)  # a decoding step past the prompt: nothing to intervene on, no work
            return args, kwargs
        mask = kwargs.get("attention_mask")
        cache = _find_cache(args, kwargs)
        offset = _cache_length(cache)
        if offset is None:
            raise ValueError(
                f"HEFT cannot tell how many tokens the {type(cache).__name__} passed to this forward already holds: it "
                "has no attention layer, and its linear-attention or state-space layers keep no token count in "
                "this transformers release (transformers >= 5.25 counts them), so the interventions cannot be "
                "placed in a forward that continues from it. generate() works (its prompt is computed from an empty "
                "cache); outside generate(), pass the whole sequence in one forward, or upgrade transformers."
            )
        if generation is not None and cache is not None and offset + seq_len > generation.last_position:
            generation.prompt_done = True  # this cached forward computes the last intervened position
        if generation is not None and offset > generation.last_position:
            call_state.set_plan(owner, None)  # a decoding step past the prompt: nothing to intervene on, no work
            return args, kwargs
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if tuple(mask.shape) != (batch, offset + seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}, but the input has {batch} row(s) of {seq_len} "
                    f"token(s) after {offset} cached one(s), so it must have shape {(batch, offset + seq_len)} "
                    "(one column per cached and new token). Pass the mask of the whole sequence."
                )
        elif mask is not None:
            mask = None  # a 4D or block mask: padding is not readable from it (generate() pins the prompt's)
        if generation is not None:
            absolute = self._pinned_locations(generation.pinned, batch)
        else:
            explicit = call_state.explicit_locations(owner)
            if isinstance(explicit, PromptHint):
                mask = explicit.prompt_mask(mask, batch, offset + seq_len, offset)  # the prompt's tokens only
                explicit = None
            elif explicit is None:
                refuse_lm_eval_call()  # lm_eval's `hf` model: context + continuation, no prompt boundary
            if explicit is None and mask is None and batch > 1:
                warn_once(
                    "batch-without-mask",
                    f"A HEFT model got {batch} rows without an attention_mask: every token counts as real, so "
                    "intervention positions counted from the end of a padded row land on padding. Pass the "
                    "attention_mask (or intervention_locations) with batched calls.",
                )
            absolute = self._locations(batch, offset + seq_len, mask, explicit, shaped.device)
        located = {key: locate(locs, offset, seq_len, self._hidden_size) for key, locs in absolute.items()}
        plan = ForwardPlan(batch=batch, seq_len=seq_len)
        for layer, entries in self._routes.items():
            kept = [(located[key], mods) for key, mods in entries if located[key] is not None]
            if kept:
                plan.routes[layer] = kept
        final = plan if plan.routes else None
        call_state.set_plan(owner, final)
        if torch.is_grad_enabled():
            self._grad_plan = final
        return args, kwargs

    def _locations(self, batch, total_len, mask, explicit, device) -> dict[tuple, torch.Tensor]:
        """Absolute locations ``(B, G, n)`` per position spec in use, from the mask or the explicit tensor."""
        if mask is not None and tuple(mask.shape) != (batch, total_len):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, but the input has {batch} row(s) of {total_len} "
                f"token(s); pass a mask of shape {(batch, total_len)}."
            )
        result = {}
        for entries in self._routes.values():
            for key, _ in entries:
                if key in result:
                    continue
                spec, share = key
                if explicit is not None:
                    locs = normalize_locations(explicit, batch, spec.num_groups(share), device)
                    _check_explicit_locations(locs, total_len)
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
                pinned[key] = locs  # this call's own state: later steps reuse the expanded tensor
            out[key] = locs
        return out

    def _layer_output_hook(self, layer: int, module, args, output):
        plan = call_state.current_plan(id(self))
        if plan is UNSET:
            # no forward of this model in this context: a checkpointed layer recomputed by backward() in an autograd
            # worker thread (GPU) gets the plan of the last forward that records gradients
            plan = self._grad_plan if torch.is_grad_enabled() else None
        if plan is None:
            return None
        entries = plan.routes.get(layer)
        if entries is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] != plan.batch or hidden.shape[1] != plan.seq_len:
            raise RuntimeError(
                f"HEFT decoder layer {layer} got hidden states of shape {tuple(hidden.shape)}, but this model's last "
                f"forward planned interventions for {plan.batch} row(s) of {plan.seq_len} token(s). Decoder layers "
                "called on their own are not intervened correctly: call the model (or its backbone) instead."
            )
        for located, mods in entries:
            hidden = intervene(hidden, located, mods)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> str:
        """The current training stage of the active adapter (see :meth:`set_stage`)."""
        return self._stage

    def _stage_records(self) -> dict[str, tuple[str, bool]]:
        """Each adapter's ``(stage, apply_interventions)``: the stage belongs to an adapter, not to the tuner."""
        records = self.__dict__.get("_adapter_stages")
        if records is None:
            records = self.__dict__["_adapter_stages"] = {}
        return records

    def _stage_of(self, adapter: str) -> tuple[str, bool]:
        """An adapter's recorded stage; one never set is ``frozen`` if loaded for inference, else ``lora``."""
        record = self._stage_records().get(adapter)
        if record is not None:
            return record
        config = self.peft_config.get(adapter)
        return ("frozen", True) if config is not None and config.inference_mode else ("lora", False)

    def _sync_current_stage(self) -> None:
        """``stage`` reads the first active adapter's stage; interventions are applied if any active adapter's are."""
        active = [a for a in self.active_adapters if a in self.peft_config]
        if active:
            self._stage = self._stage_of(active[0])[0]
            self._apply_interventions = any(self._stage_of(a)[1] for a in active)

    def _apply_stage_flags(self) -> None:
        """``requires_grad`` of every adapter from its stage: only active adapters train, in their own stage."""
        active = set(self.active_adapters)
        for adapter in self.peft_config:
            stage = self._stage_of(adapter)[0] if adapter in active else "frozen"
            LoraModel.set_requires_grad(self, adapter, requires_grad=stage in ("lora", "joint"))
            if adapter in self.heft_interventions:
                self.heft_interventions[adapter].requires_grad_(stage in ("reft", "joint"))

    def set_stage(self, stage: str, *, apply_interventions: bool | None = None, _only_refresh: bool = False) -> None:
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
        if stage not in STAGES:
            raise ValueError(f"Unknown HEFT stage {stage!r}; use one of {STAGES}.")
        apply = stage != "lora" if apply_interventions is None else bool(apply_interventions)
        records = self._stage_records()
        if _only_refresh:
            # a new adapter was injected (or adapter layers disabled): active adapters keep their recorded stages
            for adapter in self.active_adapters:
                records.setdefault(adapter, (stage, apply))
        else:
            if stage in ("lora", "reft", "joint"):
                for adapter in self.active_adapters:
                    if self.peft_config[adapter].inference_mode:
                        raise ValueError(
                            f"Adapter {adapter!r} was loaded for inference; load it with is_trainable=True to train "
                            f"stage {stage!r}."
                        )
            for adapter in self.active_adapters:
                records[adapter] = (stage, apply)
            self._apply_stage_flags()
        self._sync_current_stage()
        self._refresh_routes()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if self._heft_ready:
            self._interventions_enabled = enabled
            if enabled:
                # PEFT's enable_adapters(True) marks the active LoRA weights trainable: restore the stages' flags
                self._apply_stage_flags()
            self._refresh_routes()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Activate an adapter in the stage it was left in (its flags and interventions), see :meth:`set_stage`."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if self._heft_ready:
            if inference_mode:
                for adapter in self.heft_interventions:
                    self.heft_interventions[adapter].requires_grad_(False)
            else:
                self._apply_stage_flags()
            self._sync_current_stage()
            self._refresh_routes()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """PEFT's ``set_requires_grad``: the adapter's LoRA weights *and* interventions. The stage is not changed: the
        next :meth:`set_stage` or :meth:`set_adapter` sets the flags from the stage again."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        if self._heft_ready:
            for adapter in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
                if adapter in self.heft_interventions:
                    self.heft_interventions[adapter].requires_grad_(requires_grad)

    def _loaded_for_training(self, adapter_name: str) -> None:
        """An adapter loaded with ``is_trainable=True`` continues training both parts (``joint``)."""
        if adapter_name in self.active_adapters:
            self.set_stage("joint")
        else:
            self._stage_records()[adapter_name] = ("joint", True)

    def replace_interventions(self, adapter_name: str = "default", **settings: Any) -> None:
        """Rebuild one adapter's ReFT interventions with new intervention settings; its LoRA weights are untouched.

        The new settings are validated exactly as :class:`HeftConfig` validates them, then against this model (layers
        in range, rank at most the hidden size), before anything changes: a refused call leaves the adapter as it was.
        The new interventions are freshly initialized (from torch's RNG, like a new adapter's), placed on the
        decoder layers' devices, and trainable according to the adapter's current stage; hooks and routes are
        refreshed. The adapter's ``peft_config`` gets the new settings, so ``save_pretrained``/``from_pretrained``
        round-trip them. Used by ``StagedSFTTrainer.search_fine_stage`` to try fine-stage settings on one coarse stage.

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
        if adapter_name not in self.peft_config or adapter_name not in getattr(self, INTERVENTIONS_ATTR, {}):
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
        if new.intervention_rank > self._hidden_size:
            raise ValueError(
                f"intervention_rank={new.intervention_rank} is larger than the model's hidden size "
                f"{self._hidden_size}; use a rank <= {self._hidden_size}."
            )
        previous = self.heft_interventions[adapter_name]
        autocast = any(p.dtype == torch.float32 for p in previous.parameters()) if len(previous) else True
        self._add_interventions(self.model, adapter_name, new, layers, self._hidden_size, autocast)
        self.peft_config[adapter_name] = new
        self._apply_stage_flags()
        self._install_hooks()
        self._sync_current_stage()
        self._refresh_routes()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.heft_interventions:
            del self.heft_interventions[adapter_name]
        self._stage_records().pop(adapter_name, None)
        self._install_hooks()
        self._sync_current_stage()
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

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """``generate`` with interventions on the prompt positions.

        Locations are computed once from the prompt (or taken from ``intervention_locations``, or from the first
        ``intervention_prompt_lengths[i]`` real tokens of each row) and pinned for the whole call, in this call's own context (concurrent calls in other threads do not see them). Prompt positions
        are intervened during prefill (also when it is chunked) and reach new tokens through the KV cache; with
        ``use_cache=False`` every step recomputes the prompt with the same interventions, so both give the same
        tokens. Beam search and ``num_return_sequences`` repeat the locations per row. Without an
        ``attention_mask``, the mask is inferred from ``pad_token_id`` exactly as transformers infers it, and passed
        on, so padding is never intervened on.
        """
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        try:
            return self._generate(*args, **kwargs)
        except IndexError as error:  # only on failure: the common path pays nothing for the clearer message
            explained = _out_of_vocabulary(self.model, ids)
            if explained is None:
                raise
            raise explained from error

    def _generate(self, *args, **kwargs):
        explicit = kwargs.pop("intervention_locations", None)
        lengths = kwargs.pop(PROMPT_LENGTHS_KWARG, None)
        if explicit is not None and lengths is not None:
            raise ValueError(f"Pass either intervention_locations or {PROMPT_LENGTHS_KWARG} to generate(), not both.")
        if not self._routes:
            return self.model.generate(*args, **kwargs)
        if args and "input_ids" not in kwargs and isinstance(args[0], torch.Tensor):
            kwargs["input_ids"], args = args[0], args[1:]
        input_ids = kwargs.get("input_ids")
        shaped = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if shaped is None:
            raise ValueError("HEFT generate() needs input_ids or inputs_embeds to place the prompt interventions.")
        if shaped.shape[0] == 0 or shaped.shape[1] == 0:
            raise ValueError(
                f"HEFT generate() got a prompt of shape {tuple(shaped.shape)}: pass at least one row with at least "
                "one token."
            )
        mask = kwargs.get("attention_mask")
        if mask is None and input_ids is not None and explicit is None:
            mask = self._infer_attention_mask(input_ids, kwargs)
            kwargs["attention_mask"] = mask
        batch, prompt_len = int(shaped.shape[0]), int(shaped.shape[1])
        if lengths is not None:  # only the first n real tokens of each row are intervened on
            mask = PromptHint(prompt_lengths=torch.as_tensor(lengths)).prompt_mask(mask, batch, prompt_len, 0)
        pinned = self._locations(batch, prompt_len, mask, explicit, shaped.device)
        last = max(int(locs.max()) for locs in pinned.values())
        token = call_state.start_generation(id(self), GenerationState(pinned=pinned, last_position=last))
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            call_state.end_generation(token)

    def forward(self, *args: Any, **kwargs: Any):
        try:
            return super().forward(*args, **kwargs)
        except IndexError as error:  # only on failure: the common path pays nothing for the clearer message
            ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            explained = _out_of_vocabulary(self.model, ids)
            if explained is None:
                raise
            raise explained from error

    def _infer_attention_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The mask transformers' ``generate()`` infers without one: pad tokens are padding unless pad == eos."""
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        ones = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        if pad is None or input_ids.dim() != 2 or input_ids.is_floating_point():
            return ones
        pad_ids = torch.as_tensor(pad, device=input_ids.device).reshape(-1)
        eos_ids = torch.as_tensor(eos if eos is not None else [], device=input_ids.device).reshape(-1)
        if bool(torch.isin(eos_ids, pad_ids).any()) or not bool(torch.isin(input_ids, pad_ids).any()):
            return ones
        return (~torch.isin(input_ids, pad_ids)).long()

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
        own = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        expected = set(own)
        markers = (f"{INTERVENTIONS_ATTR}.", cls.prefix)
        missing = sorted(k for k in expected if k not in remapped)
        unexpected = sorted(k for k in remapped if any(m in k for m in markers) and k not in expected)
        if missing or unexpected:
            parts = []
            if missing:
                # named as adapter_model.safetensors names them (no adapter name), every one of them up to 20
                names = [cls._remove_adapter_name_from_key(k, adapter_name) for k in missing]
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
        tuner = _find_heft_tuner(model)
        if tuner is not None and not config.inference_mode:
            # a loaded adapter applies both parts; training continues on both until set_stage() says otherwise
            tuner._loaded_for_training(adapter_name)
        return remapped


class _RowSubset(nn.Module):
    """One adapter's intervention restricted to its rows of a mixed batch (``adapter_names=``): other rows unchanged."""

    def __init__(self, intervention: nn.Module, adapter: str, rows: list[bool]) -> None:
        super().__init__()
        self.intervention = intervention
        self.adapter = adapter
        self.rows = rows

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if base.shape[0] != len(self.rows):
            raise ValueError(
                f"adapter_names has {len(self.rows)} name(s), but the batch has {base.shape[0]} row(s); pass one "
                "adapter name per row (generate() with num_return_sequences > 1 repeats rows: repeat the names too)."
            )
        selected = torch.tensor(self.rows, device=base.device).view(-1, *([1] * (base.dim() - 1)))
        return torch.where(selected, self.intervention(base), base)


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


def _refuse_data_parallel_replica(module: nn.Module) -> None:
    """``torch.nn.DataParallel`` runs replicas of the model (``module._is_replica``, set by ``nn.Module``'s replication
    for DataParallel): their hooks would run the original's interventions, on the first device, for every replica."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "HEFT models cannot run under torch.nn.DataParallel: its replicas share the original model's forward "
            "hooks, so every replica would apply the interventions of the original (on the first GPU), not its own "
            "copy. Use DistributedDataParallel instead: launch the script with `accelerate launch` or `torchrun "
            "--nproc_per_node <gpus>` (the Trainer and StagedSFTTrainer then use DDP), or run on one GPU "
            "(CUDA_VISIBLE_DEVICES=0)."
        )


def _check_explicit_locations(locs: torch.Tensor, total_len: int) -> None:
    """Explicit locations must name real positions of the sequence, each at most once per row."""
    highest = int(locs.max())
    if highest >= total_len:
        raise ValueError(
            f"intervention_locations contains position {highest}, but the sequence has {total_len} tokens "
            f"(valid: 0..{total_len - 1}, or -1 for an unused slot)."
        )
    flat = locs.reshape(locs.shape[0], -1)
    ordered = flat.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(dim=1).nonzero()[0, 0])
        position = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(
            f"intervention_locations names position {position} more than once in row {row}; each position may be "
            "intervened on once (its changes would add up). List each position once, -1 for unused slots."
        )


def _base_parameters(module: nn.Module, prefix: str):
    """The module's own base parameters, not adapter weights (those are on "meta" with low_cpu_mem_usage)."""
    return (p for n, p in module.named_parameters() if prefix not in n)


def _compute_dtype(model: nn.Module, layer: nn.Module, prefix: str) -> torch.dtype:
    """The dtype the decoder layer computes in, never a quantized weight's.

    A layer's first base weight gives it for a plain model. Under bitsandbytes that weight is the packed uint8 (4-bit)
    or int8 (8-bit) storage: the hidden states then have the input embeddings' dtype (they are the embeddings' output),
    else the config's ``dtype``, else torch's default.
    """
    reference = next(_base_parameters(layer, prefix), None)
    if reference is not None and reference.is_floating_point():
        return reference.dtype
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    config = getattr(model, "config", None)
    for name in ("dtype", "torch_dtype"):
        dtype = getattr(config, name, None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.get_default_dtype()


def _hook_execution_device(module: nn.Module) -> torch.device | None:
    """The ``execution_device`` of an accelerate ``AlignDevicesHook`` on ``module`` (alone or in a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
            if device.type != "meta":
                return device
    return None


def _execution_device(model: nn.Module, layer: nn.Module, prefix: str) -> torch.device | None:
    """Where the decoder layer runs: its weights' device, or for weights offloaded by accelerate (on ``meta``, loaded
    for each forward from CPU or disk) the execution device of accelerate's hook on the layer, a submodule of it or
    an ancestor. ``None`` when no device is known (the interventions stay where torch puts them)."""
    reference = next(_base_parameters(layer, prefix), None)
    if reference is not None and reference.device.type != "meta":
        return reference.device
    for module in layer.modules():
        device = _hook_execution_device(module)
        if device is not None:
            return device
    # an ancestor's hook (a device map at a coarser level than the layers), the nearest one first
    name = next((n for n, m in model.named_modules() if m is layer), None)
    while name:
        name = name.rpartition(".")[0]
        device = _hook_execution_device(model.get_submodule(name))
        if device is not None:
            return device
    return None


def _find_heft_tuner(model) -> HeftModel | None:
    if isinstance(model, HeftModel):
        return model
    base = getattr(model, "base_model", None)
    return base if isinstance(base, HeftModel) else None
