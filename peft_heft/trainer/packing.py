"""Packed and padding-free batches for `StagedSFTTrainer`: each sequence keeps its own prompt and its own attention.

TRL's ``padding_free=True`` (and ``packing=True`` with ``packing_strategy="bfd"``, which implies it) flattens a batch
into one row: ``position_ids`` restart at 0 where a sequence starts, and there is no ``attention_mask``. HEFT needs two
things from such a row:

* **where each sequence's prompt is**, to put the interventions where `generate()` puts them on that prompt alone.
  Packing concatenates a per-token column (:data:`PROMPT_MASK_COLUMN`, 1 on prompt tokens) with ``input_ids``, so each
  packed sequence keeps its prompt; a padding-free batch of unpacked examples keeps each example's prompt length. The
  collator turns them into ``intervention_locations`` of the flattened row (:func:`packed_locations`).
* **attention that stops at sequence boundaries.** transformers (>= 5.24) builds a block-diagonal mask from
  restarting ``position_ids`` when a forward has no attention mask and no cache (sdpa, eager, flex attention), and
  flash-attention's variable-length kernels take the boundaries from TRL's ``cu_seq_lens_*``; TRL's ``compute_loss``
  passes ``use_cache=False``. A model whose attention ignores the boundaries (custom modelling code, an attention
  function that reads only the mask) would let a sequence read the previous one with no error, so the trainer checks
  the model once (:func:`check_packed_attention`) and refuses it.

``packing_strategy="bfd_split"`` and ``"wrapped"`` cut examples apart: the tokens after a cut no longer see their
prompt (nor its interventions), and with ``wrapped`` a row has no sequence boundaries at all. Both are refused.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from transformers.utils import logging

from ..tuner.positions import PositionSpec, compute_locations

logger = logging.get_logger(__name__)

PROMPT_MASK_COLUMN = "heft_prompt_mask"  # per token: 1 on the prompt of its sequence (survives TRL's packing)
SEQ_LENGTHS_COLUMN = "seq_lengths"  # TRL's packing: the length of each sequence packed into a row


def packs_batches(args: Any) -> bool:
    """Whether TRL's collator flattens batches into one row (TRL's own rule in `SFTTrainer.__init__`)."""
    return bool(args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split")))


def check_packing_args(args: Any) -> None:
    """Refuse the packing strategies that cut an example apart from its prompt, and packed rows without boundaries."""
    if args.eval_packing and not packs_batches(args):
        raise ValueError(
            "eval_packing=True with packing=False and padding_free=False: the evaluation rows would be packed, but "
            "TRL's collator pads batches for this run and gives a packed row one attention mask of ones, so its "
            "sequences would attend to each other. Set padding_free=True (packed and unpacked rows are then both "
            "kept apart) or eval_packing=False."
        )
    packs = args.packing or bool(args.eval_packing)
    if not packs or args.packing_strategy == "bfd":
        return
    if args.packing_strategy == "bfd_split":
        reason = (
            "it splits an example longer than max_length into fragments packed as separate sequences: the tokens "
            "after the cut no longer attend to their prompt, so they are trained without the interventions that "
            "generate() applies to them"
        )
    else:
        reason = (
            "it concatenates examples and cuts the stream every max_length tokens, so a row has no sequence "
            "boundaries: one example's tokens attend to the previous example and a prompt can start in one row and "
            "end in the next"
        )
    raise ValueError(
        f"StagedSFTTrainer does not support packing_strategy={args.packing_strategy!r}: {reason}. Use "
        "packing_strategy='bfd' (an example longer than max_length is truncated, as without packing), or "
        "padding_free=True without packing."
    )


def prompt_mask_fn(example: dict[str, Any], length_column: str) -> dict[str, list[int]]:
    """``datasets.map`` function: the prompt length of a prepared example as a per-token 0/1 column."""
    n_ids = len(example["input_ids"])
    n = min(int(example[length_column]), n_ids)
    return {PROMPT_MASK_COLUMN: [1] * n + [0] * (n_ids - n)}


def sequences_of(examples: list[dict[str, Any]], length_column: str) -> tuple[list[int], list[int]]:
    """Length and prompt length of every sequence of a batch, in the order TRL's collator concatenates them.

    A packed example carries :data:`SEQ_LENGTHS_COLUMN` and :data:`PROMPT_MASK_COLUMN`; an unpacked one is one
    sequence with its prompt length (all of it when it has none).
    """
    lengths: list[int] = []
    prompts: list[int] = []
    for example in examples:
        n_ids = len(example["input_ids"])
        if SEQ_LENGTHS_COLUMN in example:
            mask = example.get(PROMPT_MASK_COLUMN)
            if mask is None or len(mask) != n_ids:
                raise ValueError(
                    f"A packed example has no '{PROMPT_MASK_COLUMN}' column of its {n_ids} tokens, so HEFT cannot "
                    "tell where the prompt of each packed sequence is. Let StagedSFTTrainer pack the dataset "
                    "(packing=True) instead of passing a dataset packed beforehand."
                )
            start = 0
            for length in example[SEQ_LENGTHS_COLUMN]:
                lengths.append(int(length))
                prompts.append(int(sum(mask[start : start + int(length)])))
                start += int(length)
        else:
            lengths.append(n_ids)
            n = example.get(length_column)
            prompts.append(n_ids if n is None else min(int(n), n_ids))
    return lengths, prompts


def packed_locations(
    spec: PositionSpec, share_weights: bool, lengths: list[int], prompt_lengths: list[int]
) -> torch.Tensor:
    """``intervention_locations`` ``(1, groups, n)`` of a flattened row holding sequences of ``lengths`` tokens.

    Each sequence gets the positions its prompt gets alone (the same rule as a padded row: the position spec applied
    to its first ``prompt_lengths[i]`` tokens), shifted by where the sequence starts in the row; ``-1`` slots stay.
    """
    count = len(lengths)
    widest = max(prompt_lengths, default=0)
    if count == 0 or widest == 0:
        return torch.full((1, spec.num_groups(share_weights), 1), -1, dtype=torch.long)
    prompt_mask = torch.arange(widest).unsqueeze(0) < torch.tensor(prompt_lengths).unsqueeze(1)
    local = compute_locations(spec, prompt_mask.long(), count, widest, share_weights)  # (S, G, n)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).view(count, 1, 1)
    shifted = torch.where(local >= 0, local + starts, local)
    groups, width = shifted.shape[1], shifted.shape[2]
    return shifted.permute(1, 0, 2).reshape(1, groups, count * width)


def check_packed_attention(model: Any, atol_fraction: float = 0.1) -> None:
    """Refuse a model whose attention lets a packed sequence see the one before it (checked once, on the model).

    Three no-grad forwards of 12 random tokens, adapters off: a second sequence packed after a first (``position_ids``
    restarting), the second alone, and the second continuing the first (what leaking attention computes). Packed
    must equal alone; it counts as leaking when it is further from alone than ``atol_fraction`` of the leaking
    forward's distance (numerical noise of half precision stays far below that). Skipped, with a log line, when the
    weights are not materialized here (meta or partitioned parameters, e.g. DeepSpeed ZeRO-3 or FSDP's RAM-efficient
    loading): the same modelling code runs either way, and transformers' mask functions are what is checked.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(base.parameters())
    if not params or any(p.device.type == "meta" or p.numel() == 0 for p in params):
        logger.info("Packed-attention check skipped: the model's weights are not materialized in this process.")
        return
    embeddings = base.get_input_embeddings()
    vocab = int(embeddings.num_embeddings)
    device = embeddings.weight.device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(vocab, (1, 6), generator=generator).to(device) for _ in range(2))
    restart = torch.arange(6, device=device)
    was_training = base.training
    base.eval()
    try:
        disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with torch.no_grad(), disabled:
            packed = base(
                input_ids=torch.cat([first, second], 1),
                position_ids=torch.cat([restart, restart]).unsqueeze(0),
                use_cache=False,
            ).logits[:, 6:]
            alone = base(input_ids=second, position_ids=restart.unsqueeze(0), use_cache=False).logits
            leaking = base(input_ids=torch.cat([first, second], 1), use_cache=False).logits[:, 6:]
    finally:
        base.train(was_training)
    off = float((packed.float() - alone.float()).abs().max())
    leak = float((leaking.float() - alone.float()).abs().max())
    if leak > 0 and off > atol_fraction * leak:
        implementation = getattr(base.config, "_attn_implementation", None)
        raise ValueError(
            f"Packed and padding-free batches put several sequences in one row, and this model's attention "
            f"(attn_implementation={implementation!r}, {type(base).__name__}) lets a sequence attend to the one "
            f"before it: its logits move by {off:.3g} against the sequence alone. Training on such rows is silently "
            "wrong. Load the model with an attention that honours position_ids restarts "
            "(attn_implementation='flash_attention_2' on GPU, or 'sdpa' / 'eager' on a transformers model that "
            "builds its mask with transformers.masking_utils), or set packing=False and padding_free=False."
        )
