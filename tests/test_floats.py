"""f16/bf16 casts are bit-exact with ggml's rounding on every class of finite float32."""

import numpy as np
import pytest

from llmconv.quantize import floats, quantize_tensor


def every_kind_of_float32(n=2_000_000, seed=0):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    special = np.array(
        [
            0.0,
            -0.0,
            65504.0,
            65520.0,
            -65520.0,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            1e-45,
            3.4e38,
            1.0 + 2**-11,
            1.0 + 3 * 2**-11,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
        ],
        dtype=np.float32,
    )
    return np.concatenate([x, special, rng.standard_normal(100_000).astype(np.float32)])


def test_f16_matches_numpy_round_to_nearest_even():
    x = every_kind_of_float32()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(floats.f16_quantize(x).view(np.uint16), want)


def test_bf16_matches_ggml_rule():
    x = every_kind_of_float32()
    assert np.array_equal(floats.bf16_quantize(x).view(np.uint16), floats.bf16_reference(x))


@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_roundtrip_and_nonfinite(name):
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    from llmconv.quantize import dequantize_tensor

    y = dequantize_tensor(quantize_tensor(x, name), name)
    assert np.allclose(x, y, rtol=1e-2, atol=1e-3)
    x[3, 7] = np.inf
    from llmconv.quantize import NonFiniteError

    with pytest.raises(NonFiniteError) as e:
        quantize_tensor(x, name)
    assert e.value.row == 3


def test_bf16_bits_to_f16_is_the_cast_for_every_bf16():
    """The integer transcode (bf16 source -> f16 output, no float32, no torch) against numpy's
    float16 cast of the widened value, for all 65536 bf16 bit patterns, NaN and inf included;
    and as a 2-D block of rows, as the engine calls it."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16).view(np.uint16)
    got = floats.bf16_bits_to_f16(bits, np.empty_like(bits))
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
    rows = bits.reshape(256, 256)[::-1]
    assert np.array_equal(floats.bf16_bits_to_f16(rows, np.empty_like(rows)), want.reshape(256, 256)[::-1])
