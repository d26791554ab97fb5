"""Draw docs/assets/positions.png: which tokens of a real SmolLM2 chat prompt `f5+l5` intervenes on.

Run: `python scripts/positions_figure.py` (uses the embedded tokenizer; see docs/embedded-defaults.md).
The positions come from `peft_heft.compute_locations`, the function the model itself uses.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from peft_heft import PositionSpec, compute_locations  # noqa: E402
from peft_heft.assets import resolve_model_name_or_path  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "positions.png"


def main() -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model_name_or_path("embedded:smollm2-135m-instruct"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Review: a gripping, funny film.\nPositive or negative?"},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    answer = tok("Positive<|im_end|>", add_special_tokens=False)["input_ids"]
    width = len(prompt) + len(answer) + 3
    rows = []
    for padding in ("right", "left"):
        pad = width - len(prompt) - len(answer)
        ids = prompt + answer
        real = [1] * len(prompt) + [0] * pad  # interventions see the prompt only (answer masked out in SFT)
        full = ids + [tok.pad_token_id] * pad if padding == "right" else [tok.pad_token_id] * pad + ids
        prompt_mask = real if padding == "right" else [0] * pad + [1] * len(prompt) + [0] * len(answer)
        prompt_mask = (prompt_mask + [0] * width)[:width]
        locs = compute_locations(PositionSpec.parse("f5+l5"), torch.tensor([prompt_mask]), 1, width, False)
        hit = set(locs[locs >= 0].tolist())
        kinds = []
        for i in range(len(full)):
            is_pad = (padding == "right" and i >= len(ids)) or (padding == "left" and i < pad)
            is_answer = not is_pad and not prompt_mask[i]
            kinds.append("pad" if is_pad else "hit" if i in hit else "answer" if is_answer else "prompt")
        rows.append((padding, [tok.decode([t]) for t in full], kinds))

    colors = {"hit": "#f4a261", "prompt": "#e9ecef", "answer": "#90be6d", "pad": "#ffffff"}
    fig, axes = plt.subplots(len(rows), 1, figsize=(18, 2.6 * len(rows)))
    for ax, (padding, tokens, kinds) in zip(axes, rows, strict=True):
        for i, (text, kind) in enumerate(zip(tokens, kinds, strict=True)):
            ax.add_patch(plt.Rectangle((i, 0), 0.95, 1, color=colors[kind], ec="#999999", lw=0.5))
            label = text.replace("\n", "\\n").strip() or "␣"
            ax.text(i + 0.47, 0.5, label[:9], rotation=90, ha="center", va="center", fontsize=7)
        ax.set_xlim(0, len(tokens))
        ax.set_ylim(0, 1)
        ax.axis("off")
        ax.set_title(f"{padding} padding", loc="left", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, ec="#999999") for c in colors.values()]
    fig.legend(
        handles,
        ["intervened (f5 + l5 of the prompt)", "prompt, not intervened", "answer (trained on)", "padding"],
        loc="lower center",
        ncol=4,
        fontsize=9,
    )
    fig.suptitle(
        'intervention_positions="f5+l5" on a chat prompt (SmolLM2 tokenizer): first 5 and last 5 '
        "prompt tokens, whatever the padding",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=100)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
