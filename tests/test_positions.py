import pytest
import torch

from peft_heft.tuner.positions import PositionSpec, compute_locations, normalize_locations


def test_parse_specs():
    assert PositionSpec.parse("f7+l7") == PositionSpec(7, 7)
    assert PositionSpec.parse(" F3 ") == PositionSpec(3, 0)
    assert PositionSpec.parse("l2") == PositionSpec(0, 2)
    assert PositionSpec.parse("all") == PositionSpec(all=True)
    for bad in ["", "f", "l3+f2", "f3+", "+l3", "f3l2", "x7", "f-1"]:
        with pytest.raises(ValueError):
            PositionSpec.parse(bad)


def _pyreft_reference(n_real: int, first: int, last: int) -> tuple[list[int], list[int]]:
    """pyreft's get_intervention_locations rule: each side clipped to min(n, len // 2)."""
    f = min(n_real // 2, first)
    lst = min(n_real // 2, last)
    return list(range(f)), list(range(n_real - lst, n_real))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("spec", ["f3+l2", "f1", "l4"])
def test_locations_follow_real_tokens_for_both_padding_sides(padding, spec):
    lengths = [9, 5, 2, 1]
    width = 10
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if padding == "left":
            mask[i, width - n :] = 1
        else:
            mask[i, :n] = 1
    parsed = PositionSpec.parse(spec)
    locs = compute_locations(parsed, mask, len(lengths), width, share_weights=False)
    for i, n in enumerate(lengths):
        start = width - n if padding == "left" else 0
        firsts, lasts = _pyreft_reference(n, parsed.first, parsed.last)
        expected_groups = []
        if parsed.first and parsed.last:
            expected_groups = [firsts, lasts]
        elif parsed.first:
            expected_groups = [firsts]
        else:
            expected_groups = [lasts]
        for g, expected in enumerate(expected_groups):
            got = [p for p in locs[i, g].tolist() if p >= 0]
            assert got == [start + p for p in expected]
            # never a padding position
            assert all(mask[i, p] == 1 for p in got)


def test_shared_weights_puts_both_sides_in_one_group():
    mask = torch.ones(1, 8, dtype=torch.long)
    locs = compute_locations(PositionSpec.parse("f2+l2"), mask, 1, 8, share_weights=True)
    assert locs.tolist() == [[[0, 1, 6, 7]]]


def test_all_positions():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    locs = compute_locations(PositionSpec.parse("all"), mask, 2, 3, share_weights=False)
    assert locs.tolist() == [[[1, 2, -1]], [[0, 1, 2]]]


def test_no_mask_means_all_real():
    locs = compute_locations(PositionSpec.parse("f1+l1"), None, 2, 4, share_weights=False)
    assert locs.tolist() == [[[0], [3]], [[0], [3]]]


def test_normalize_explicit_locations():
    assert normalize_locations([[1, 2]], 1, 1, torch.device("cpu")).shape == (1, 1, 2)
    with pytest.raises(ValueError, match="expected \\(batch=2"):
        normalize_locations([[1, 2]], 2, 1, torch.device("cpu"))
    with pytest.raises(TypeError, match="integer token positions"):
        normalize_locations(torch.zeros(1, 1, 2), 1, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="-1 for an unused slot"):
        normalize_locations([[[-3]]], 1, 1, torch.device("cpu"))


def test_huge_position_counts_allocate_only_what_the_row_can_hold():
    spec = PositionSpec(first=100_000_000, last=100_000_000)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    locs = compute_locations(spec, mask, 1, 6, share_weights=False)
    assert locs.tolist() == [[[1, 2, -1], [4, 5, -1]]]  # 5 real tokens: 2 a side, 3 slots (half the row) at most
