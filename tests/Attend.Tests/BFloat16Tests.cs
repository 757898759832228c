using Attend.Tensors;

namespace Attend.Tests;

public sealed class BFloat16Tests
{
    [Theory]
    [InlineData(1.0f, 0x3F80)]
    [InlineData(-2.5f, 0xC020)]
    [InlineData(1.00390625f, 0x3F80)]      // exactly halfway between 0x3F80 and 0x3F81: ties to even (down)
    [InlineData(1.01171875f, 0x3F82)]      // halfway between 0x3F81 and 0x3F82: ties to even (up)
    [InlineData(1.0039064f, 0x3F81)]       // one float ulp above halfway: up
    [InlineData(float.PositiveInfinity, 0x7F80)]
    [InlineData(3.4028235e38f, 0x7F80)]    // float max rounds to infinity
    [InlineData(-0.0f, 0x8000)]
    public void Should_round_to_nearest_even(float value, int bits) => Assert.Equal((ushort)bits, ((BFloat16)value).Bits);

    [Fact]
    public void Should_keep_nan_a_nan() => Assert.True(float.IsNaN((float)(BFloat16)float.NaN));

    [Fact]
    public void Should_convert_in_bulk_exactly_like_the_scalar_conversion()
    {
        // Lengths 0..257 cover every vector remainder; special values ride along.
        float[] all = [.. TestData.Normal(300, 5, 100f), float.NaN, float.PositiveInfinity, float.NegativeInfinity, 0f, -0f, 1e-40f, 1.00390625f];
        for (int n = 0; n <= 257; n += n < 40 ? 1 : 17)
        {
            float[] src = all[^Math.Min(n, all.Length)..];
            var dst = new BFloat16[src.Length];
            ElementConvert.ToBFloat16(src, dst);
            var back = new float[src.Length];
            ElementConvert.ToSingle(dst, back);
            for (int i = 0; i < src.Length; i++)
            {
                Assert.Equal(((BFloat16)src[i]).Bits, dst[i].Bits);
                Assert.Equal((float)(BFloat16)src[i], back[i]);
            }
        }
    }
}

public sealed class HalfConversionTests
{
    [Fact]
    public void Should_widen_every_half_exactly_in_bulk()
    {
        // All 65,536 bit patterns: normals, subnormals, zeros, infinities and NaNs.
        var all = new Half[65536];
        for (int i = 0; i < all.Length; i++) all[i] = BitConverter.UInt16BitsToHalf((ushort)i);
        var wide = new float[all.Length];
        ElementConvert.ToSingle(all, wide);
        for (int i = 0; i < all.Length; i++)
        {
            float expected = (float)all[i];
            if (float.IsNaN(expected)) Assert.True(float.IsNaN(wide[i]), $"0x{i:X4}");
            else Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(wide[i]), $"0x{i:X4}: {wide[i]} vs {expected}");
        }
    }
}
