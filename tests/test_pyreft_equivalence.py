"""Numerical equivalence of HEFT's interventions with pyreft's, module by module and end to end.

pyreft (0.0.7, installed with ``--no-deps``) is the reference implementation of LoReFT / NoReFT / DiReFT. These tests
copy pyreft's weights into ``peft_heft``'s classes and require the same numbers, then run a tiny Llama through
``pyreft.ReftModel`` (pyvene's ``IntervenableModel``) and through a HEFT adapter and require the same logits.
Skipped only when pyreft is not installed.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a notice about nnsight on import
    pyreft = pytest.importorskip("pyreft")

import peft  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_heft  # noqa: E402
from peft_heft.tuner import interventions as heft_interventions  # noqa: E402
from peft_heft.tuner.positions import PositionSpec, compute_locations  # noqa: E402

D, R = 16, 4
TYPES = ("loreft", "noreft", "direft")
PYREFT_CLASSES = {
    "loreft": pyreft.LoreftIntervention,
    "noreft": pyreft.NoreftIntervention,
    "direft": pyreft.DireftIntervention,
}
OUR_CLASSES = {
    "loreft": heft_interventions.LoreftIntervention,
    "noreft": heft_interventions.NoreftIntervention,
    "direft": heft_interventions.DireftIntervention,
}


# ---------------------------------------------------------------------------------------------- helpers
def _kwargs(kind: str, d: int, r: int, act_fn=None, add_bias=True, dropout=0.0) -> dict:
    kwargs = dict(embed_dim=d, low_rank_dimension=r, dtype=torch.float32, dropout=dropout, act_fn=act_fn)
    if kind == "noreft":
        kwargs["add_bias"] = add_bias  # pyreft's NoReFT requires it
    return kwargs


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Give the non-rotation weights visible values (pyreft's default init is small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rotate_layer" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Copy a pyreft intervention's weights into ours (same math, different parametrization of R)."""
    ours.learned_source.load_state_dict(theirs.learned_source.state_dict())
    if hasattr(theirs, "proj_layer"):
        ours.proj_layer.load_state_dict(theirs.proj_layer.state_dict())
    if hasattr(theirs, "rotate_layer"):
        # ours: householder orthogonal parametrization without trivialization; assignment goes through right_inverse
        ours.rotate_layer.weight = theirs.rotate_layer.weight.detach().clone()
        torch.testing.assert_close(ours.rotate_layer.weight, theirs.rotate_layer.weight, atol=1e-6, rtol=0)


def _pair(kind: str, seed: int = 0, d: int = D, r: int = R, **kw):
    torch.manual_seed(seed)
    theirs = PYREFT_CLASSES[kind](**_kwargs(kind, d, r, **kw))
    _randomize(theirs, seed + 100)
    ours = OUR_CLASSES[kind](**_kwargs(kind, d, r, **kw))
    _copy_weights(ours, theirs)
    return ours.eval(), theirs.eval()


def _closed_form(kind: str, module: torch.nn.Module, h: torch.Tensor, act=lambda t: t) -> torch.Tensor:
    """The papers' formulas, by hand, in float64, with h as row vectors."""
    h = h.double()
    W = module.learned_source.weight.double()  # (r, d)
    b = module.learned_source.bias.double()  # (r,)
    source = act(h @ W.T + b)
    if kind == "noreft":
        W2 = module.proj_layer.weight.double()  # (r, d)
        proj = h @ W2.T + (module.proj_layer.bias.double() if module.proj_layer.bias is not None else 0.0)
        return h + (source - proj) @ W2
    Rm = module.rotate_layer.weight.T.double()  # (r, d): orthonormal rows
    if kind == "loreft":
        return h + (source - h @ Rm.T) @ Rm  # h + R^T (W h + b - R h)
    return h + source @ Rm  # DiReFT: h + R^T (W h + b)


def tiny_llama(seed: int = 0, layers: int = 3, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------- 1. module level
@pytest.mark.parametrize("act_fn", [None, "relu"])
@pytest.mark.parametrize("kind", TYPES)
def test_module_matches_pyreft_float32(kind, act_fn):
    ours, theirs = _pair(kind, act_fn=act_fn)
    if hasattr(ours, "rotate_layer"):
        rot = ours.rotate_layer.weight  # (d, r) = R^T
        torch.testing.assert_close(rot.T @ rot, torch.eye(R), atol=1e-6, rtol=0)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, want = ours(x), theirs(x)
        assert got.shape == x.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        act = torch.relu if act_fn == "relu" else (lambda t: t)
        torch.testing.assert_close(got.double(), _closed_form(kind, ours, x, act), atol=1e-5, rtol=0)
        assert (got - x).abs().max() > 1e-2  # the intervention does something


def test_noreft_without_bias_matches_pyreft():
    ours, theirs = _pair("noreft", add_bias=False)
    assert ours.proj_layer.bias is None
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x).double(), _closed_form("noreft", ours, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", TYPES)
def test_module_matches_pyreft_bf16_input(kind):
    """float32 params, bf16 hidden states: computed in float32, returned in bf16.

    pyreft's LoReFT/NoReFT cannot take a bf16 input with float32 params (``F.linear`` raises on the dtype mismatch),
    so the reference is pyreft on the same values upcast to float32, rounded to bf16 at the end, which is exactly
    what pyreft's ``output.to(base.dtype)`` does.
    """
    ours, theirs = _pair(kind, seed=1)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.no_grad():
        got = ours(x)
        assert got.dtype == torch.bfloat16
        want = theirs(x.float()).to(torch.bfloat16)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=0)
        reference = _closed_form(kind, ours, x.float()).to(torch.bfloat16).float()
        # one bf16 ulp of slack for values landing on a rounding boundary
        torch.testing.assert_close(got.float(), reference, atol=2e-2, rtol=1e-2)
        if kind == "direft":  # pyreft's DiReFT casts its input itself, so it takes bf16 directly
            torch.testing.assert_close(got.float(), theirs(x).float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- 2. no d x d buffer
@pytest.mark.parametrize("kind", TYPES)
def test_no_d_by_d_tensor(kind):
    d, r = 64, 4
    ours, theirs = _pair(kind, d=d, r=r)
    limit = d * r + r
    tensors = dict(ours.state_dict())
    tensors.update({f"buffer:{k}": v for k, v in ours.named_buffers()})  # non-persistent ones too
    tensors.update({f"param:{k}": v for k, v in ours.named_parameters()})
    too_big = {k: tuple(v.shape) for k, v in tensors.items() if v.numel() > limit}
    assert not too_big, f"tensors larger than d*r + r = {limit}: {too_big}"
    # after a training step nothing d x d appears either
    ours.train()
    ours(torch.randn(2, 3, d)).sum().backward()
    assert all(v.numel() <= limit for v in ours.state_dict().values())
    if kind != "noreft":  # the point of the exercise: pyreft keeps a d x d base for R
        assert any(b.numel() == d * d for b in theirs.buffers())


# ---------------------------------------------------------------------------------------------- 3. dropout
@pytest.mark.parametrize("kind", TYPES)
def test_dropout_off_in_eval_and_same_as_pyreft_in_train(kind):
    ours, theirs = _pair(kind, dropout=0.5)
    ours_nodrop, _ = _pair(kind, dropout=0.0)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ours.eval()
        first, second = ours(x), ours(x)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, ours_nodrop.eval()(x), atol=1e-6, rtol=0)
        # training mode: dropout is active, and it is pyreft's dropout (same mask for the same RNG state)
        ours.train()
        theirs.train()
        torch.manual_seed(123)
        got = ours(x)
        torch.manual_seed(123)
        want = theirs(x)
        assert (got == 0).float().mean() > 0.2
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- 4. end to end
CASES = [
    # (positions, share_weights, layers)
    ("l3", False, [0, 2]),
    ("f2+l2", True, [1, -1]),
    ("f2+l3", False, [0, 1, 2]),  # two groups: two separately-weighted interventions per layer
]


def _reft_pair(positions: str, share: bool, layers: list[int], r: int = 4):
    base = tiny_llama(seed=0)
    d, n_layers = base.config.hidden_size, base.config.num_hidden_layers
    heft_base = copy.deepcopy(base)  # before pyvene touches `base`
    resolved = sorted(layer % n_layers for layer in layers)
    groups = PositionSpec.parse(positions).num_groups(share)

    torch.manual_seed(42)
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": r,
            "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=r, dtype=torch.float32),
        }
        for layer in resolved
        for _ in range(groups)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        reft_model = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=representations))
    reft_model.eval()
    theirs = [reft_model.interventions[k] for k in reft_model.interventions]  # order of `representations`
    assert len(theirs) == len(resolved) * groups
    for i, module in enumerate(theirs):
        _randomize(module, seed=200 + i)

    config = peft_heft.HeftConfig(
        task_type="CAUSAL_LM",
        r=4,
        target_modules=["q_proj", "v_proj"],
        intervention_layers=layers,
        intervention_rank=r,
        intervention_positions=positions,
        share_intervention_weights=share,
    )
    model = peft.get_peft_model(heft_base, config)
    model.base_model.set_stage("reft")
    ours = model.base_model.heft_interventions["default"]
    keys = (
        [f"layer{layer}" for layer in resolved]
        if groups == 1
        else [f"layer{layer}_{side}" for layer in resolved for side in ("first", "last")]
    )
    assert sorted(ours.keys()) == sorted(keys)
    for key, module in zip(keys, theirs, strict=True):
        _copy_weights(ours[key], module)
    model.eval()
    return reft_model, model, groups


@pytest.mark.parametrize(("positions", "share", "layers"), CASES)
def test_end_to_end_logits_match_pyreft(positions, share, layers):
    reft_model, model, groups = _reft_pair(positions, share, layers)
    batch, seq_len = 3, 11
    ids = torch.randint(3, 97, (batch, seq_len), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    locs = compute_locations(PositionSpec.parse(positions), mask, batch, seq_len, share)  # (B, G, n)
    assert locs.shape[:2] == (batch, groups)
    # no padding: plain ints; a group narrower than the widest ("f2" beside "l3") has trailing -1 slots, dropped here
    per_group = [[[p for p in row if p >= 0] for row in locs[:, g, :].tolist()] for g in range(groups)]
    spec = PositionSpec.parse(positions)
    widths = [spec.first + spec.last] if groups == 1 else [spec.first, spec.last]
    assert [len(rows[0]) for rows in per_group] == widths
    n_layers = len(reft_model.interventions) // groups
    # pyvene: [num_interventions][batch][positions], interventions in the order of `representations`
    unit_locations = [per_group[g] for _ in range(n_layers) for g in range(groups)]

    with torch.no_grad():
        want = reft_model(
            base={"input_ids": ids, "attention_mask": mask}, unit_locations={"sources->base": (None, unit_locations)}
        )[1].logits
        got = model(input_ids=ids, attention_mask=mask).logits
        explicit = model(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits

    assert (want - plain).abs().max() > 1e-2  # pyreft's interventions changed the output: the comparison has teeth
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(explicit, want, atol=1e-4, rtol=0)
    if groups == 1:
        with torch.no_grad():
            flat = model(input_ids=ids, attention_mask=mask, intervention_locations=locs[:, 0, :]).logits
        torch.testing.assert_close(flat, want, atol=1e-4, rtol=0)


def test_end_to_end_left_padding_matches_pyreft():
    """Left padding: our locations (from the real tokens) given to pyreft as absolute positions, same logits."""
    positions, share = "f2+l2", True
    reft_model, model, _ = _reft_pair(positions, share, [0, 2])
    lengths, width = (11, 8, 5), 11
    g = torch.Generator().manual_seed(6)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, 97, (n,), generator=g)
        mask[i, width - n :] = 1
    locs = compute_locations(PositionSpec.parse(positions), mask, len(lengths), width, share)
    assert (locs >= 0).all()  # every row is long enough: no unused slot
    for i, n in enumerate(lengths):  # the first two and last two real tokens
        assert locs[i, 0].tolist() == [width - n, width - n + 1, width - 2, width - 1]
    unit_locations = [locs[:, 0, :].tolist() for _ in range(2)]
    with torch.no_grad():
        want = reft_model(
            base={"input_ids": ids, "attention_mask": mask}, unit_locations={"sources->base": (None, unit_locations)}
        )[1].logits
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- 5. pluggability
@pytest.fixture
def pyreft_loreft_registered():
    peft_heft.register_intervention_type("pyreft_loreft", pyreft.LoreftIntervention)
    try:
        yield "pyreft_loreft"
    finally:
        heft_interventions.INTERVENTION_TYPES.pop("pyreft_loreft", None)


def test_registered_pyreft_intervention_trains_and_generates(pyreft_loreft_registered, tmp_path):
    base = tiny_llama(seed=1, layers=2)
    reference = copy.deepcopy(base)  # LoRA starts at B = 0: only the interventions change the output
    config = peft_heft.HeftConfig(
        task_type="CAUSAL_LM",
        r=4,
        target_modules=["q_proj", "v_proj"],
        intervention_layers=[0, 1],
        intervention_rank=4,
        intervention_positions="f2+l2",
        intervention_type=pyreft_loreft_registered,
    )
    model = peft.get_peft_model(base, config)
    modules = model.base_model.heft_interventions["default"]
    assert len(modules) == 4 and all(isinstance(m, pyreft.LoreftIntervention) for m in modules.values())
    model.base_model.set_stage("reft")

    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    # (the plain output comes from a copy of the base model)
    model.eval()
    with torch.no_grad():
        plain = reference(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, 9, 97) and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4  # the pyreft interventions act

    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 12) and torch.equal(generated[:, :9], ids)

    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            assert p.requires_grad, f"{name}.{pname} is frozen in stage 'reft'"
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}.{pname}"
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and not any(p.requires_grad for p in lora)

    # pyreft overrides state_dict(), so its weights are invisible to PEFT's saving: refused, not saved half
    with pytest.raises(ValueError, match="state_dict"):
        model.save_pretrained(tmp_path / "adapter")


@pytest.mark.parametrize("stage", ["reft", "frozen"])
def test_disable_adapter_keeps_stage_trainability(stage):
    config = peft_heft.HeftConfig(
        task_type="CAUSAL_LM",
        r=4,
        target_modules=["q_proj", "v_proj"],
        intervention_layers=[0, 1],
        intervention_rank=4,
        intervention_positions="f2+l2",
    )
    model = peft.get_peft_model(tiny_llama(seed=1, layers=2), config)
    model.base_model.set_stage(stage)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and not any(p.requires_grad for p in lora)
    with model.disable_adapter():
        pass
    assert model.base_model.stage == stage
    assert not any(p.requires_grad for p in lora), f"LoRA weights trainable in stage {stage!r} after disable_adapter()"


def test_registration_is_cleaned_up():
    assert "pyreft_loreft" not in heft_interventions.INTERVENTION_TYPES
