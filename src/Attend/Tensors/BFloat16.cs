using System.Globalization;
using System.Runtime.CompilerServices;

namespace Attend.Tensors;

/// <summary>
/// bfloat16: sign, 8 exponent bits and 7 mantissa bits — the upper half of an IEEE binary32.
/// Conversion from <see cref="float"/> rounds to nearest, ties to even (as PyTorch and the hardware do);
/// NaN stays NaN (quiet), infinities stay infinite.
/// </summary>
public readonly struct BFloat16 : IEquatable<BFloat16>, IComparable<BFloat16>, IFormattable
{
    /// <summary>The raw 16 bits.</summary>
    public ushort Bits { get; }

    private BFloat16(ushort bits) => Bits = bits;

    /// <summary>Reinterprets raw bits as a bfloat16 (no conversion).</summary>
    public static BFloat16 FromBits(ushort bits) => new(bits);

    /// <summary>Rounds a float to the nearest bfloat16, ties to even.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static explicit operator BFloat16(float value) => new(RoundToBits(value));

    /// <summary>Widens exactly to float.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static explicit operator float(BFloat16 value) => BitConverter.Int32BitsToSingle(value.Bits << 16);

    /// <summary>Widens exactly to double.</summary>
    public static explicit operator double(BFloat16 value) => (float)value;

    /// <summary>Rounds a double to bfloat16 (through float).</summary>
    public static explicit operator BFloat16(double value) => (BFloat16)(float)value;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static ushort RoundToBits(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if ((bits & 0x7FFF_FFFFu) > 0x7F80_0000u)
        {
            return (ushort)((bits >> 16) | 0x0040u); // quiet NaN, sign kept
        }
        uint roundingBias = 0x7FFFu + ((bits >> 16) & 1u);
        return (ushort)((bits + roundingBias) >> 16);
    }

    /// <summary>The float value.</summary>
    public float ToSingle() => (float)this;

    /// <inheritdoc/>
    public bool Equals(BFloat16 other) => ((float)this).Equals((float)other);

    /// <inheritdoc/>
    public override bool Equals(object? obj) => obj is BFloat16 other && Equals(other);

    /// <inheritdoc/>
    public override int GetHashCode() => ((float)this).GetHashCode();

    /// <inheritdoc/>
    public int CompareTo(BFloat16 other) => ((float)this).CompareTo((float)other);

    /// <inheritdoc/>
    public override string ToString() => ((float)this).ToString(CultureInfo.InvariantCulture);

    /// <inheritdoc/>
    public string ToString(string? format, IFormatProvider? formatProvider) => ((float)this).ToString(format, formatProvider);

    /// <summary>Value equality (NaN is unequal to everything).</summary>
    public static bool operator ==(BFloat16 left, BFloat16 right) => (float)left == (float)right;

    /// <summary>Value inequality.</summary>
    public static bool operator !=(BFloat16 left, BFloat16 right) => !(left == right);

    /// <summary>Ordering by value.</summary>
    public static bool operator <(BFloat16 left, BFloat16 right) => (float)left < (float)right;

    /// <summary>Ordering by value.</summary>
    public static bool operator >(BFloat16 left, BFloat16 right) => (float)left > (float)right;

    /// <summary>Ordering by value.</summary>
    public static bool operator <=(BFloat16 left, BFloat16 right) => (float)left <= (float)right;

    /// <summary>Ordering by value.</summary>
    public static bool operator >=(BFloat16 left, BFloat16 right) => (float)left >= (float)right;
}
