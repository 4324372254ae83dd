"""Quantization schemes, int4 packing and observers, checked against bounds and hand-computed values."""
import numpy as np
import pytest
import torch

from slimcart.compress.quantize.observers import make_observer
from slimcart.compress.quantize.schemes import (
    QuantScheme,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from slimcart.errors import SlimcartError


pytestmark = pytest.mark.usefixtures("one_thread")


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


UNIFORM = [
    QuantScheme(bits=8, symmetric=True, granularity="per_tensor"),
    QuantScheme(bits=8, symmetric=False, granularity="per_channel"),
    QuantScheme(bits=4, symmetric=True, granularity="per_group", group_size=32),
    QuantScheme(bits=4, symmetric=False, granularity="per_group", group_size=128),
    QuantScheme(bits=3, symmetric=False, granularity="per_channel"),
    QuantScheme(bits=2, symmetric=True, granularity="per_group", group_size=64),
]


@pytest.mark.parametrize("scheme", UNIFORM, ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'asym'}-{s.granularity}")
def test_uniform_error_within_half_step(scheme):
    w = _w(16, 256)
    codes, p = quantize(w, scheme)
    err = (dequantize(codes, p) - w).abs()
    rows = err.reshape(p.rows, -1) if scheme.granularity != "per_channel" else err
    # min/max calibration: nothing is clipped, so every element is within half a step of its row's scale
    assert (rows <= p.scale[:, None] / 2 + 1e-6).all()
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax


def test_uniform_error_hand_computed():
    # symmetric 8-bit per tensor: amax 1.27 -> scale 0.01; 0.005 rounds to half a step (0 or 0.01)
    w = torch.tensor([[1.27, -0.635, 0.333, 0.0]])
    codes, p = quantize(w, QuantScheme(bits=8, granularity="per_tensor"))
    assert p.scale.item() == pytest.approx(0.01)
    assert codes.tolist() == [[127, -64, 33, 0]]  # -63.5 rounds half-to-even to -64


def test_symmetric_maps_zero_exactly():
    w = _w(8, 64)
    w[:, ::3] = 0.0
    for s in [QuantScheme(bits=b, symmetric=sym, granularity=g, group_size=32 if g == "per_group" else None)
              for b in (2, 4, 8) for sym in (True, False) for g in ("per_tensor", "per_channel", "per_group")]:
        assert (fake_quantize(w, s)[:, ::3] == 0).all(), s


def test_asymmetric_uses_full_code_range_on_skewed_data():
    # ReLU-like skew: mostly positive; symmetric wastes the negative half of its codes
    torch.manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((4096,)) - 0.2
    asym = QuantScheme(bits=4, symmetric=False, granularity="per_tensor")
    sym = QuantScheme(bits=4, symmetric=True, granularity="per_tensor")
    ca, _ = quantize(x, asym)
    cs, _ = quantize(x, sym)
    assert ca.min() == 0 and ca.max() == 15
    assert len(torch.unique(ca)) > 1.5 * len(torch.unique(cs))
    assert ((fake_quantize(x, asym) - x) ** 2).mean() < ((fake_quantize(x, sym) - x) ** 2).mean()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_beats_uniform_on_gaussian(bits):
    w = _w(32, 512)
    km = QuantScheme(bits=bits, levels="kmeans", granularity="per_channel")
    mse_km = ((fake_quantize(w, km) - w) ** 2).mean()
    for sym in (True, False):
        uni = QuantScheme(bits=bits, symmetric=sym, granularity="per_channel")
        assert mse_km < ((fake_quantize(w, uni) - w) ** 2).mean()
    codes, p = quantize(w, km)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits and p.codebook.shape == (32, 2**bits)


def test_pow2_levels_are_powers_of_two():
    w = _w(4, 64)
    s = QuantScheme(bits=4, levels="pow2", granularity="per_channel")
    codes, p = quantize(w, s)
    d = dequantize(codes, p)
    ratio = (d / p.scale[:, None])[d != 0].abs()
    assert torch.allclose(torch.log2(ratio), torch.round(torch.log2(ratio)))
    assert ratio.min() >= 2.0**-6 and ratio.max() == 1.0  # 7 magnitudes: 2^-6 .. 2^0
    # every element goes to its nearest level (checked by brute force over the level set)
    levels = torch.cat([torch.zeros(1), 2.0 ** torch.arange(-6, 1).float()])
    for r in range(4):
        m = w[r].abs() / p.scale[r]
        best = levels[(m[:, None] - levels[None]).abs().argmin(1)]
        assert torch.allclose(d[r].abs() / p.scale[r], best)


def test_per_channel_axis_and_nd_shapes():
    w = _w(3, 5, 7)
    s = QuantScheme(bits=8, granularity="per_channel", axis=1)
    codes, p = quantize(w, s)
    assert codes.shape == w.shape and p.rows == 5
    amax = w.abs().amax(dim=(0, 2))
    assert torch.allclose(p.scale, amax / 127)


@pytest.mark.parametrize("signed", [False, True])
def test_pack_int4_round_trips_bit_exactly(signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    c = torch.randint(lo, hi, (7, 64), generator=torch.Generator().manual_seed(1))
    packed = pack_int4(c, signed=signed)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert torch.equal(unpack_int4(packed, signed=signed).long(), c)


def test_pack_int4_nibble_order():
    # element 0 in the low nibble, element 1 in the high nibble
    assert pack_int4(torch.tensor([0x3, 0xA])).tolist() == [0xA3]
    assert pack_int4(np.array([-1, 1]), signed=True).tolist() == [0x1F]


@pytest.mark.parametrize("kwargs,msg", [
    ({"bits": 1}, "bits"),
    ({"bits": 9}, "bits"),
    ({"granularity": "per_group", "group_size": 48}, "group_size"),
    ({"granularity": "per_group"}, "group_size"),
    ({"group_size": 64}, "only used"),
    ({"levels": "pow2", "symmetric": False}, "pow2"),
])
def test_bad_schemes_raise(kwargs, msg):
    with pytest.raises(SlimcartError, match=msg):
        QuantScheme(**kwargs)


def test_bad_tensors_raise():
    g = QuantScheme(bits=4, granularity="per_group", group_size=64)
    with pytest.raises(SlimcartError, match="does not divide"):
        quantize(_w(4, 96), g)
    bad = _w(4, 64)
    bad[1, 2] = float("nan")
    with pytest.raises(SlimcartError, match="NaN or inf"):
        quantize(bad, QuantScheme())
    bad[1, 2] = float("inf")
    with pytest.raises(SlimcartError, match="NaN or inf"):
        quantize(bad, g)
    with pytest.raises(SlimcartError, match="even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(SlimcartError, match="lie in"):
        pack_int4(torch.tensor([0, 16]))


# ---------------------------------------------------------------- observers

def test_minmax_and_moving_average_hand_computed():
    mm, ma = make_observer("minmax"), make_observer("moving_average", momentum=0.5)
    for batch in ([0.0, 4.0], [-2.0, 2.0], [-1.0, 8.0]):
        mm.update(torch.tensor(batch))
        ma.update(torch.tensor(batch))
    assert mm.range() == (-2.0, 8.0)
    # lo: 0 -> 0.5*0 + 0.5*-2 = -1 -> 0.5*-1 + 0.5*-1 = -1; hi: 4 -> 3 -> 5.5
    assert ma.range() == pytest.approx((-1.0, 5.5))


def test_percentile_of_known_array():
    o = make_observer("percentile", percentile=99.0)
    o.update(torch.arange(0, 101, dtype=torch.float32))  # 0..100: 1st and 99th percentiles are 1 and 99
    assert o.range() == pytest.approx((1.0, 99.0))


def test_mse_clip_matches_laplace_optimum():
    # Known result (Banner et al., ACIQ): for Laplace(0, b) at 8 bits the MSE-optimal clip is ~9.89 b.
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((400_000,))
    o = make_observer("mse", scheme=QuantScheme(bits=8, granularity="per_tensor"), grid=100, min_ratio=0.5,
                     max_samples=400_000)
    o.update(x)
    lo, hi = o.range()
    assert lo == -hi and hi <= float(x.abs().max())
    assert 9.89 * 0.93 < hi < 9.89 * 1.07


def test_mse_clip_keeps_full_range_without_outliers():
    o = make_observer("mse", scheme=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"))
    x = torch.linspace(-1, 1, 10001)
    o.update(x)
    assert o.range()[1] >= 0.98


def test_entropy_clips_outliers_but_not_uniform():
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    g[:5] = 60.0
    o = make_observer("entropy")
    o.update(g)
    lo, hi = o.range()
    assert lo == -hi and float(g[5:].abs().quantile(0.99)) < hi < 20.0
    u = make_observer("entropy")
    u.update(torch.linspace(-1, 1, 50_001))
    assert u.range()[1] > 0.95


def test_observer_params_cover_range():
    o = make_observer("minmax")
    o.update(torch.tensor([-1.0, 3.0]))
    p = o.params(QuantScheme(bits=8, symmetric=False, granularity="per_tensor"))
    assert p.scale.item() == pytest.approx(4.0 / 255) and p.zero_point.item() == round(1.0 / (4.0 / 255))


def test_observer_bad_input():
    o = make_observer("minmax")
    with pytest.raises(SlimcartError, match="no calibration"):
        o.range()
    with pytest.raises(SlimcartError, match="NaN"):
        o.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(SlimcartError, match="empty"):
        o.update(torch.tensor([]))
    with pytest.raises(SlimcartError, match="unknown observer"):
        make_observer("magic")
