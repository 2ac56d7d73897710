"""SPDFQ's generation pieces against direct computations: GMM priors, APA, MSR regions, soft labels."""

from __future__ import annotations

import math

import pytest
import torch

from methods.synth.attention_priors import (
    apa_loss,
    cls_attention,
    crop_resized,
    deeper_half,
    gmm_map,
    quadrant_regions,
    random_gmm_priors,
    soft_cross_entropy,
    soft_labels,
    window_attention_map,
)


def test_gmm_map_sums_to_one_and_peaks_at_its_centres():
    centres = torch.tensor([[1.0, 1.0], [1.0, 10.0], [10.0, 2.0], [7.0, 8.0], [12.0, 12.0]])
    prior = gmm_map((14, 14), centres, torch.full((5,), 0.8), torch.full((5,), 0.2))
    assert prior.shape == (196,) and prior.sum().item() == pytest.approx(1.0, abs=1e-6)
    grid = prior.view(14, 14)
    padded = torch.nn.functional.pad(grid[None, None], (1, 1, 1, 1), value=-1.0)[0, 0]
    peaks = {(r, c) for r in range(14) for c in range(14)
             if grid[r, c] > padded[r:r + 3, c:c + 3].flatten().topk(2).values[1]}
    assert peaks == {(1, 1), (1, 10), (10, 2), (7, 8), (12, 12)}  # K = 5 local maxima, at the centres
    # one Gaussian: the density itself, normalised
    one = gmm_map((3, 4), torch.tensor([[1.0, 2.0]]), torch.tensor([1.5]), torch.tensor([1.0]))
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    direct = torch.exp(-((rows - 1) ** 2 + (cols - 2) ** 2) / (2 * 1.5**2)).flatten()
    torch.testing.assert_close(one, direct / direct.sum())


def test_random_priors_are_seeded_per_image_and_head():
    a = random_gmm_priors((2, 3, 4), (7, 7), 5, torch.Generator().manual_seed(0))
    b = random_gmm_priors((2, 3, 4), (7, 7), 5, torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 4, 49) and torch.equal(a, b)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 4))
    flat = a.reshape(-1, 49)
    assert len({tuple(p.tolist()) for p in flat}) == flat.shape[0]  # a different prior for every head


def test_apa_is_zero_at_the_prior_and_weights_depth():
    priors = [torch.softmax(torch.randn(2, 3, 16), -1) for _ in range(2)]
    assert apa_loss(priors, priors, [3, 4], 4).item() == 0.0
    att = [p + 0.1 for p in priors]
    # every head's MSE is 0.01: sum over 3 heads, weights 3/4 and 4/4
    assert apa_loss(att, priors, [3, 4], 4).item() == pytest.approx((3 / 4 + 1) * 3 * 0.01, rel=1e-5)
    assert deeper_half(12) == list(range(6, 13)) and deeper_half(4) == [2, 3, 4]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_msr_regions_never_overlap_and_have_the_asked_sizes(count):
    size = (15, 20)
    for seed in range(5):
        boxes = quadrant_regions(size, count, torch.Generator().manual_seed(seed))
        assert len(boxes) == count
        cover = torch.zeros(size)
        for top, left, h, w in boxes:
            cover[top:top + h, left:left + w] += 1
            assert (h, w) in {(7, 10), (8, 10)}
        assert cover.max() == 1 and cover.sum() == sum(h * w for *_, h, w in boxes)
    x = torch.arange(4 * 4, dtype=torch.float32).view(1, 1, 4, 4)
    torch.testing.assert_close(crop_resized(x, (0, 2, 2, 2), (2, 2)), x[..., 0:2, 2:4])  # same size: as is
    with pytest.raises(ValueError, match="1..4"):
        quadrant_regions(size, 5, torch.Generator())


def test_soft_labels_put_their_mass_on_the_given_classes():
    g = torch.Generator().manual_seed(3)
    t = soft_labels(10, [[2], [4, 7]], g)
    z_draw = 5 + 5 * torch.rand(3, generator=torch.Generator().manual_seed(3))
    z = torch.zeros(2, 10)
    z[0, 2], z[1, 4], z[1, 7] = z_draw[0], z_draw[1], z_draw[2]
    torch.testing.assert_close(t, z.softmax(-1))
    # Z >= 5 at the given classes, 0 elsewhere: their mass is at least e^5 / (e^5 + 9) (one class of 10)
    assert t[0, 2] >= math.exp(5) / (math.exp(5) + 9) - 1e-6
    assert t[1, [4, 7]].sum() >= 2 * math.exp(5) / (2 * math.exp(5) + 8) - 1e-6
    assert torch.allclose(t[0, [0, 1, 3]], t[0, 0].expand(3))  # every other class gets the same mass
    logits = torch.randn(2, 10)
    direct = -sum(t[i] @ logits[i].log_softmax(-1) for i in range(2)) / 2
    assert soft_cross_entropy(logits, t).item() == pytest.approx(float(direct), rel=1e-6)
    assert math.isclose(t.sum().item(), 2.0, rel_tol=1e-6)


def test_window_attention_lands_on_its_windows_and_undoes_the_shift():
    """A map whose every key in window i has mean attention i+1: each token of the 8x8 grid must get its
    window's value, windows in row-major order; with a cyclic shift s the map is rolled back by +s."""
    b, heads, ws, grid = 2, 3, 4, (8, 8)
    n_win = (8 // ws) ** 2
    probs = torch.zeros(b * n_win, heads, ws * ws, ws * ws)
    for i in range(b * n_win):
        probs[i] = (i % n_win) + 1.0  # constant over queries and keys
    out = window_attention_map(probs, grid, ws).view(b, heads, 8, 8)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = (rows // ws) * 2 + cols // ws + 1.0
    assert torch.equal(out[1, 2], expected)
    shifted = window_attention_map(probs, grid, ws, shift=2).view(b, heads, 8, 8)
    assert torch.equal(shifted[0, 0], torch.roll(expected, shifts=(2, 2), dims=(0, 1)))
    # a real timm Swin block: the query-mean of softmax rows, laid back, still sums to the window count
    from tiny import tiny_swin

    from methods.quant.surgery import AttentionRecorder

    model = tiny_swin()
    with torch.no_grad(), AttentionRecorder(model, roles=("av",), keep_inputs=True) as rec:
        model(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
        first = rec.inputs["av"][0][0]  # block 0 of stage 0: 8x8 tokens, 4x4 windows, no shift
    att = window_attention_map(first, (8, 8), 4)
    assert att.shape == (2, 2, 64)
    torch.testing.assert_close(att.sum(-1), torch.full((2, 2), 4.0))  # 4 windows, each row sums to 1


def test_cls_attention_is_the_class_query_row():
    probs = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    torch.testing.assert_close(cls_attention(probs, 1), probs[:, :, 0, 1:])


def _spdfq(model, family, seed=0, iterations=6, **kw):
    from tiny import SPEC

    from methods.synth.spdfq_generation import generate_spdfq_images

    return generate_spdfq_images(
        model, model, SPEC, batch_size=4, iterations=iterations, warmup=1, lr=0.2,
        generator=torch.Generator().manual_seed(seed), num_classes=kw.pop("num_classes", 10), family=family,
        prefix_tokens=1 if family == "vit" else 0, patch_grid=(4, 4) if family == "vit" else None, jitter=1,
        **kw,
    )


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_spdfq_generation_is_seeded_and_has_every_term(family):
    from tiny import tiny_swin, tiny_vit

    model = tiny_vit() if family == "vit" else tiny_swin()
    a, b = _spdfq(model, family), _spdfq(model, family)
    assert torch.equal(a.images, b.images) and a.history == b.history
    assert not torch.equal(a.images, _spdfq(model, family, seed=1).images)
    assert {"apa", "msr", "sl", "tv"} <= set(a.history[0])
    assert a.meta["apa_depths"] == ([1, 2] if family == "vit" else [2, 3, 4])
    dense = _spdfq(model, family, num_classes=None, iterations=2)  # det/seg: APA + TV only
    assert set(dense.history[0]) == {"loss", "apa", "tv"}


def test_spdfq_apa_pulls_the_attention_to_the_prior():
    from tiny import tiny_vit

    model = tiny_vit()
    only = dict(iterations=40, use_msr=False, use_sl=False, tv_weight=0.0)
    res = _spdfq(model, "vit", apa_weight=1e4, **only)
    control = _spdfq(model, "vit", apa_weight=1e-9, **only)  # the same measurement, no pull
    assert res.history[0]["apa"] == control.history[0]["apa"]  # same start (same seed and priors)
    assert res.history[-1]["apa"] < res.history[0]["apa"]
    assert res.history[-1]["apa"] < control.history[-1]["apa"]
