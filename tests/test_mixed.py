"""Mixed precision: bit-spec parsing, cost accounting against hand-computed numbers, the greedy
allocator on constructed cases, cached re-forwards, and the generic allocator on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny import make_ctx, make_target, tiny_swin, tiny_vit
from torch import nn

from methods.base import get_method
from methods.baselines import minmax_policy
from methods.quant.bits import BitSpec, BitSpecError, parse_bits
from methods.quant.mixed import (
    AllocationError,
    DownstreamForward,
    Unit,
    average_bits,
    bops,
    greedy_allocate,
    site_costs,
)
from methods.quant.policy import apply_policy, calibrate, model_size_bits
from methods.quant.reconstruct import block_units


def test_parse_mixed_specs():
    assert parse_bits("mp5").mixed == (5.0, 5.0) and parse_bits("mp5").is_mixed
    b = parse_bits("mpw4.9a6.2")
    assert b.mixed == (4.9, 6.2) and b.name == "mpw4.9a6.2" and not b.is_fp and not b.is_allocated
    assert b.with_layers({"fc": (4, 6)}).is_allocated
    assert b.to_record()["mixed"] == [4.9, 6.2]
    for bad, msg in (("mp9", "outside"), ("mp1", "outside"), ("mpw4", "unknown bit spec")):
        with pytest.raises(BitSpecError, match=msg):
            parse_bits(bad)


class TwoLinear(nn.Module):
    """Two tokens through Linear(4, 3) then Linear(3, 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.l2(self.l1(x))


def test_costs_bops_and_size_equal_hand_computed_numbers():
    m = TwoLinear()
    bits = BitSpec("mp", None, None, mixed=(6.0, 7.0)).with_layers({"l1": (4, 8), "l2": (8, 4)})
    resolved = apply_policy(m, minmax_policy(), bits)
    x = torch.randn(5, 2, 4)
    costs = site_costs(m, lambda: m(x), batch=5)
    # per image: l1 2 tokens x 3 outputs x 4 inputs = 24 MACs, l2 2 x 2 x 3 = 12
    assert (costs["l1"].macs, costs["l2"].macs) == (24, 12)
    assert (costs["l1"].weights, costs["l2"].weights) == (12, 6)
    assert (costs["l1"].act_elements, costs["l2"].act_elements) == (8, 6)  # 2x4, 2x3 inputs
    w_avg, a_avg = average_bits(costs, resolved.layers)
    assert w_avg == pytest.approx((12 * 4 + 6 * 8) / 18)
    assert a_avg == pytest.approx((8 * 8 + 6 * 4) / 14)
    assert bops(costs, resolved.layers) == 24 * 4 * 8 + 12 * 8 * 4
    assert bops(costs, {}) == (24 + 12) * 32 * 32  # unquantized: 32 x 32
    # weights at their bits, biases (3 + 2) at 32
    assert model_size_bits(m, resolved) == 12 * 4 + 6 * 8 + 5 * 32


def _table_loss(penalty: dict[str, dict[int, float]], state: dict[str, int]):
    return lambda _unit: sum(penalty[p][b] for p, b in state.items())


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_greedy_cuts_the_cheaper_unit_and_meets_the_budget_exactly(mode):
    # two weight units of 10 params each; lowering "a" costs little, lowering "b" a lot
    units = [Unit("a", "w", 10), Unit("b", "w", 10)]
    state = {"a": 8, "b": 8}
    penalty = {"a": {8: 0.0, 6: 0.1, 5: 0.2, 4: 0.3}, "b": {8: 0.0, 6: 5.0, 5: 9.0, 4: 20.0}}

    def set_bits(u, b):
        state[u.path] = b

    res = greedy_allocate(units, (6.0, 8.0), (4, 5, 6, 8), set_bits, _table_loss(penalty, state), mode=mode)
    # average 6 needs 4 bits cut off 16 in total: a goes 8 -> 6 -> 5 -> 4, then b is never cut
    assert {u.path: b for u, b in res.bits.items()} == {"a": 4, "b": 8}
    assert res.averages[0] == pytest.approx(6.0)
    assert [s["unit"] for s in res.steps] == ["a:w", "a:w", "a:w"]
    assert res.loss_end == pytest.approx(0.3)


def test_greedy_counts_fixed_sites_and_rejects_an_unreachable_budget():
    units = [Unit("a", "a", 10)]
    state = {"a": 8}

    def set_bits(u, b):
        state[u.path] = b

    loss = _table_loss({"a": {8: 0.0, 6: 0.0, 5: 0.0, 4: 0.0}}, state)
    # a fixed 8-bit site of 10 elements: (10*4 + 80) / 20 = 6 is the lowest reachable average
    res = greedy_allocate(units, (8.0, 6.0), (4, 5, 6, 8), set_bits, loss, fixed={"a": (80.0, 10.0)})
    assert res.averages[1] == pytest.approx(6.0) and state["a"] == 4
    state["a"] = 8
    with pytest.raises(AllocationError, match="cannot reach the budget"):
        greedy_allocate(units, (8.0, 5.0), (4, 5, 6, 8), set_bits, loss, fixed={"a": (80.0, 10.0)})


def test_downstream_forward_equals_the_full_forward_and_skips_blocks():
    model = tiny_vit(head_scale=4.0)
    apply_policy(model, minmax_policy(), parse_bits("w4a4"))
    x = torch.randn(8, 1, 16, 16)
    calibrate(model, [x])
    blocks = block_units(model)
    assert blocks == ["patch_embed", "blocks.0", "blocks.1", "head"]
    runner = DownstreamForward(model, blocks, lambda: model(x))
    full = runner.refresh()
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    out = runner.run(2)  # blocks before blocks.1 replaced by their outputs
    handle.remove()
    assert torch.equal(out, full) and calls == []
    # a change inside blocks.1 is seen by run(2)
    model.blocks[1].mlp.fc2.a_quant.set_bits(2)
    assert not torch.equal(runner.run(2), full)


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_generic_allocator_meets_the_budget_on_the_method_own_images(tmp_path, make):
    model = make()
    target = make_target(model, "swin" if make is tiny_swin else "vit")
    ctx = make_ctx(tmp_path)  # asking for real images fails the test
    cls = get_method("noise-ptq")  # data-free: its own noise images
    result = cls(cls.make_config("ci")).quantize(target, parse_bits("mpw4.5a5"), ctx)
    mp = ctx.extra["mixed_precision"]
    assert mp["allocator"] == "generic" and mp["sensitivity_data"]["source"] == "noise"
    assert mp["sensitivity_data"]["data_free"] is True
    layers = result.resolved_bits.layers
    assert set(b for wa in layers.values() for b in wa if b is not None) <= {2, 3, 4, 5, 6, 8}
    x = torch.zeros(1, 1, 16, 16)
    w_avg, a_avg = average_bits(site_costs(result.model, lambda: result.model(x), 1), layers)
    assert w_avg <= 4.5 + 1e-9 and a_avg <= 5.0 + 1e-9
    assert (w_avg, a_avg) == pytest.approx(tuple(mp["averages"]))
    # the evaluated model runs the map: every quantizer has its site's allocated bits
    for path, (w, a) in layers.items():
        site = result.model.get_submodule(path)
        if w is not None:
            assert site.w_quant.bits == w
        if a is not None:
            assert site.a_quant.bits == a


def test_data_free_allocation_never_reads_real_images(tmp_path):
    """psaq-vit allocates on its generated images; make_ctx's real loader raises if called."""
    target = make_target(tiny_vit(head_scale=4.0))
    cls = get_method("psaq-vit")
    cfg = cls.make_config("ci", batch_size=4, iterations=2, warmup=1)
    ctx = make_ctx(tmp_path)
    cls(cfg).quantize(target, parse_bits("mp6"), ctx)
    assert ctx.extra["mixed_precision"]["sensitivity_data"]["source"] == "psaq-vit"
    assert ctx.data_sources["calibration"]["data_free"] is True


def test_an_mp_job_records_its_map_costs_and_plot(tmp_path):
    """A mixed-precision job through the harness on mini-vit: the record holds the allocated map,
    the allocation, its costs (consistent with the map) and a PNG bit-width plot; the cost table
    renders it."""
    from bench import api
    from bench.progress import make_reporter
    from bench.store import ResultStore
    from bench.tables import write_tables

    plan = api.make_plan(methods="minmax-ptq", tasks="cls", models="mini-vit", bits="mp5,w4a4", seeds="0")
    summary = api.run(plan, tmp_path, reporter=make_reporter(stream=None))
    assert summary.count("failed") == 0
    records = {r["bits"]: r for r in ResultStore(tmp_path).records()}
    mp, w4 = records["mp5"], records["w4a4"]
    assert mp["bit_spec"]["mixed"] == [5.0, 5.0] and mp["extra"]["mixed_precision"]["allocator"] == "generic"
    assert mp["cost"]["w_avg_bits"] <= 5.0 and mp["cost"]["a_avg_bits"] <= 5.0
    assert mp["cost"]["w_avg_bits"] == pytest.approx(mp["extra"]["mixed_precision"]["averages"][0])
    assert w4["cost"]["w_avg_bits"] == 4.0 and w4["cost"]["a_avg_bits"] == 4.0
    assert w4["cost"]["macs"] == mp["cost"]["macs"] == records["fp"]["cost"]["macs"]
    assert records["fp"]["cost"]["bops"] == records["fp"]["cost"]["macs"] * 32 * 32
    assert w4["cost"]["bops"] == w4["cost"]["macs"] * 16  # every site at 4 x 4
    assert w4["cost"]["size_mb"] == pytest.approx(w4["model_size_bits"] / 8 / 2**20)
    png = mp["plots"]["layer_bits"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and "layer_bits" not in w4["plots"]
    (_, _, texts, _), = write_tables(ResultStore(tmp_path), task="cls")
    assert "size_mb/gbops/avg_bits" in texts["md"] and "w4.00 a4.00" in texts["md"]


def test_bench_list_names_each_method_allocator():
    from bench.cli import mp_allocator

    assert mp_allocator(get_method("mptq-vit")) == "own"
    assert {mp_allocator(get_method(m)) for m in ("minmax-ptq", "psaq-vit", "mimiq", "spdfq")} == {"generic"}
    assert mp_allocator(get_method("fp")) == ""
