using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace Attend.Tensors;

/// <summary>Bulk conversion between element types; float ↔ bfloat16 is vectorized.</summary>
public static class ElementConvert
{
    /// <summary>Widens bfloat16 to float (exact).</summary>
    public static void ToSingle(ReadOnlySpan<BFloat16> source, Span<float> destination)
    {
        CheckLengths(source.Length, destination.Length);
        ReadOnlySpan<ushort> bits = MemoryMarshal.Cast<BFloat16, ushort>(source);
        Span<uint> outBits = MemoryMarshal.Cast<float, uint>(destination);
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i <= bits.Length - Vector256<ushort>.Count; i += Vector256<ushort>.Count)
            {
                Vector256<ushort> v = Vector256.LoadUnsafe(ref MemoryMarshal.GetReference(bits), (nuint)i);
                (Vector256<uint> lo, Vector256<uint> hi) = Vector256.Widen(v);
                Vector256.ShiftLeft(lo, 16).StoreUnsafe(ref MemoryMarshal.GetReference(outBits), (nuint)i);
                Vector256.ShiftLeft(hi, 16).StoreUnsafe(ref MemoryMarshal.GetReference(outBits), (nuint)(i + Vector256<uint>.Count));
            }
        }
        for (; i < bits.Length; i++)
        {
            outBits[i] = (uint)bits[i] << 16;
        }
    }

    /// <summary>Rounds float to bfloat16, nearest with ties to even; NaN stays NaN.</summary>
    public static void ToBFloat16(ReadOnlySpan<float> source, Span<BFloat16> destination)
    {
        CheckLengths(source.Length, destination.Length);
        ReadOnlySpan<uint> bits = MemoryMarshal.Cast<float, uint>(source);
        Span<ushort> outBits = MemoryMarshal.Cast<BFloat16, ushort>(destination);
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            Vector256<uint> absMask = Vector256.Create(0x7FFF_FFFFu);
            Vector256<uint> infBits = Vector256.Create(0x7F80_0000u);
            for (; i <= bits.Length - 2 * Vector256<uint>.Count; i += 2 * Vector256<uint>.Count)
            {
                Vector256<uint> a = Round(Vector256.LoadUnsafe(ref MemoryMarshal.GetReference(bits), (nuint)i), absMask, infBits);
                Vector256<uint> b = Round(Vector256.LoadUnsafe(ref MemoryMarshal.GetReference(bits), (nuint)(i + Vector256<uint>.Count)), absMask, infBits);
                Vector256.Narrow(a, b).StoreUnsafe(ref MemoryMarshal.GetReference(outBits), (nuint)i);
            }
        }
        for (; i < bits.Length; i++)
        {
            outBits[i] = BFloat16.RoundToBits(BitConverter.UInt32BitsToSingle(bits[i]));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<uint> Round(Vector256<uint> x, Vector256<uint> absMask, Vector256<uint> infBits)
    {
        Vector256<uint> rounded = (x + Vector256.Create(0x7FFFu) + ((x >> 16) & Vector256<uint>.One)) >> 16;
        Vector256<uint> quietNan = (x >> 16) | Vector256.Create(0x0040u);
        Vector256<uint> isNan = Vector256.GreaterThan(x & absMask, infBits);
        return Vector256.ConditionalSelect(isNan, quietNan, rounded);
    }

    /// <summary>Widens half to float (exact), vectorized with integer ops: the exponent/mantissa bits shifted into
    /// float position and scaled by 2^112 (which also turns half subnormals into exact floats); Inf/NaN get the float
    /// exponent; the sign is put back.</summary>
    public static void ToSingle(ReadOnlySpan<Half> source, Span<float> destination)
    {
        CheckLengths(source.Length, destination.Length);
        ReadOnlySpan<ushort> bits = MemoryMarshal.Cast<Half, ushort>(source);
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            Vector256<float> magic = Vector256.Create(5.192296858534828e33f);   // 2^112
            for (; i <= bits.Length - Vector256<ushort>.Count; i += Vector256<ushort>.Count)
            {
                (Vector256<uint> lo, Vector256<uint> hi) = Vector256.Widen(Vector256.LoadUnsafe(ref MemoryMarshal.GetReference(bits), (nuint)i));
                Widen(lo, magic).StoreUnsafe(ref MemoryMarshal.GetReference(destination), (nuint)i);
                Widen(hi, magic).StoreUnsafe(ref MemoryMarshal.GetReference(destination), (nuint)(i + Vector256<uint>.Count));
            }
        }
        for (; i < source.Length; i++)
        {
            destination[i] = (float)source[i];
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Widen(Vector256<uint> h, Vector256<float> magic)
    {
        Vector256<uint> em = h & Vector256.Create(0x7FFFu);
        Vector256<uint> sign = (h & Vector256.Create(0x8000u)) << 16;
        Vector256<float> value = (em << 13).AsSingle() * magic;
        Vector256<uint> special = Vector256.GreaterThanOrEqual(em, Vector256.Create(0x7C00u));   // Inf or NaN
        Vector256<uint> infNan = (em << 13) | Vector256.Create(0x7F800000u);
        return (Vector256.ConditionalSelect(special, infNan, value.AsUInt32()) | sign).AsSingle();
    }

    /// <summary>Rounds float to half, nearest with ties to even.</summary>
    public static void ToHalf(ReadOnlySpan<float> source, Span<Half> destination)
    {
        CheckLengths(source.Length, destination.Length);
        for (int i = 0; i < source.Length; i++)
        {
            destination[i] = (Half)source[i];
        }
    }

    /// <summary>Widens a span of float, Half or BFloat16 (the bulk, vectorized paths above; a copy for float).</summary>
    internal static void ToSingle<T>(ReadOnlySpan<T> source, Span<float> destination) where T : unmanaged
    {
        if (typeof(T) == typeof(float)) MemoryMarshal.Cast<T, float>(source).CopyTo(destination);
        else if (typeof(T) == typeof(Half)) ToSingle(MemoryMarshal.Cast<T, Half>(source), destination[..source.Length]);
        else if (typeof(T) == typeof(BFloat16)) ToSingle(MemoryMarshal.Cast<T, BFloat16>(source), destination[..source.Length]);
        else
        {
            for (int i = 0; i < source.Length; i++) destination[i] = ToSingle(source[i]);
        }
    }

    /// <summary>Widens 16-bit storage bits (f16 or bf16 by <paramref name="storage"/>) to floats.</summary>
    internal static void ToSingle(DType storage, ReadOnlySpan<ushort> bits, Span<float> destination)
    {
        if (storage == DType.Float16) ToSingle(MemoryMarshal.Cast<ushort, Half>(bits), destination[..bits.Length]);
        else ToSingle(MemoryMarshal.Cast<ushort, BFloat16>(bits), destination[..bits.Length]);
    }

    /// <summary>Converts one element of any supported type to float.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToSingle<T>(T value) where T : unmanaged
    {
        if (typeof(T) == typeof(float)) return Unsafe.As<T, float>(ref value);
        if (typeof(T) == typeof(Half)) return (float)Unsafe.As<T, Half>(ref value);
        if (typeof(T) == typeof(BFloat16)) return (float)Unsafe.As<T, BFloat16>(ref value);
        if (typeof(T) == typeof(double)) return (float)Unsafe.As<T, double>(ref value);
        throw new NotSupportedException(typeof(T).Name);
    }

    /// <summary>Converts one element of any supported type to double (exact for every supported type).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static double ToDouble<T>(T value) where T : unmanaged
    {
        if (typeof(T) == typeof(double)) return Unsafe.As<T, double>(ref value);
        return ToSingle(value);
    }

    /// <summary>Rounds a float to the element type <typeparamref name="T"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static T FromSingle<T>(float value) where T : unmanaged
    {
        if (typeof(T) == typeof(float)) return Unsafe.As<float, T>(ref value);
        if (typeof(T) == typeof(Half)) { Half h = (Half)value; return Unsafe.As<Half, T>(ref h); }
        if (typeof(T) == typeof(BFloat16)) { BFloat16 b = (BFloat16)value; return Unsafe.As<BFloat16, T>(ref b); }
        if (typeof(T) == typeof(double)) { double d = value; return Unsafe.As<double, T>(ref d); }
        throw new NotSupportedException(typeof(T).Name);
    }

    /// <summary>Rounds a double to the element type <typeparamref name="T"/> (once, not through float for f64).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static T FromDouble<T>(double value) where T : unmanaged
    {
        if (typeof(T) == typeof(double)) return Unsafe.As<double, T>(ref value);
        if (typeof(T) == typeof(Half)) { Half h = (Half)value; return Unsafe.As<Half, T>(ref h); }
        return FromSingle<T>((float)value);
    }

    private static void CheckLengths(int source, int destination)
    {
        if (destination < source)
        {
            throw new ArgumentException($"destination must hold at least {source} elements; got {destination}", nameof(destination));
        }
    }
}
