using System.Runtime.InteropServices;

namespace Attend.Tensors;

/// <summary>
/// An owned, C-order tensor of any rank and a runtime dtype: what files hold. <see cref="AsView{T}"/> gives the
/// typed strided view the kernels take.
/// </summary>
public sealed class Tensor
{
    private Tensor(DType dtype, int[] shape, Array data)
    {
        DType = dtype;
        Shape = shape;
        Data = data;
    }

    /// <summary>Element type.</summary>
    public DType DType { get; }

    /// <summary>Extent of each dimension (C order).</summary>
    public IReadOnlyList<int> Shape { get; }

    /// <summary>The elements: a float[], Half[], BFloat16[] or double[] of <see cref="ElementCount"/> elements.</summary>
    public Array Data { get; }

    /// <summary>Product of the shape.</summary>
    public long ElementCount => Data.LongLength;

    /// <summary>Wraps an array (not copied) with a shape whose product is its length.</summary>
    public static Tensor FromArray<T>(T[] data, params int[] shape) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(shape);
        long count = 1;
        foreach (int d in shape)
        {
            if (d < 0) throw new ArgumentException($"shape must be non-negative; got {TensorView<T>.FormatShape<int>(shape)}", nameof(shape));
            count *= d;
        }
        if (count != data.LongLength)
        {
            throw new ArgumentException($"shape {TensorView<T>.FormatShape<int>(shape)} holds {count} elements; data has {data.LongLength}", nameof(data));
        }
        return new Tensor(DTypes.Of<T>(), (int[])shape.Clone(), data);
    }

    /// <summary>A zero-filled tensor.</summary>
    public static Tensor Zeros(DType dtype, params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(shape);
        long count = 1;
        foreach (int d in shape) count *= d;
        Array data = dtype switch
        {
            DType.Float32 => new float[count],
            DType.Float16 => new Half[count],
            DType.BFloat16 => new BFloat16[count],
            DType.Float64 => new double[count],
            _ => throw new ArgumentOutOfRangeException(nameof(dtype)),
        };
        return new Tensor(dtype, (int[])shape.Clone(), data);
    }

    /// <summary>The typed array.</summary>
    /// <exception cref="ArgumentException">when <typeparamref name="T"/> is not the tensor's dtype.</exception>
    public T[] Array<T>() where T : unmanaged =>
        Data as T[] ?? throw new ArgumentException($"tensor holds {DTypes.Name(DType)}, not {DTypes.Name(DTypes.Of<T>())}", nameof(T));

    /// <summary>A contiguous view of the elements (no copy).</summary>
    public TensorView<T> AsView<T>() where T : unmanaged => new(Array<T>(), [.. Shape]);

    /// <summary>The raw bytes of the elements (little-endian machine layout).</summary>
    public Span<byte> AsBytes() => Data switch
    {
        float[] f => MemoryMarshal.AsBytes(f.AsSpan()),
        Half[] h => MemoryMarshal.AsBytes(h.AsSpan()),
        BFloat16[] b => MemoryMarshal.AsBytes(b.AsSpan()),
        double[] d => MemoryMarshal.AsBytes(d.AsSpan()),
        _ => throw new InvalidOperationException("unknown element array"),
    };

    /// <summary>Converts every element to float (a copy, even for f32).</summary>
    public float[] ToSingleArray()
    {
        var result = new float[ElementCount];
        switch (Data)
        {
            case float[] f: f.CopyTo(result, 0); break;
            case Half[] h: ElementConvert.ToSingle(h, result); break;
            case BFloat16[] b: ElementConvert.ToSingle(b, result); break;
            case double[] d: for (int i = 0; i < d.Length; i++) result[i] = (float)d[i]; break;
        }
        return result;
    }

    /// <summary>Converts to another dtype (rounding to nearest even).</summary>
    public Tensor ConvertTo(DType dtype)
    {
        if (dtype == DType)
        {
            return new Tensor(dtype, [.. Shape], (Array)Data.Clone());
        }
        int[] shape = [.. Shape];
        if (dtype == DType.Float64)
        {
            var d = new double[ElementCount];
            switch (Data)
            {
                case float[] f: for (int i = 0; i < f.Length; i++) d[i] = f[i]; break;
                default:
                    float[] s = ToSingleArray();
                    for (int i = 0; i < s.Length; i++) d[i] = s[i];
                    break;
            }
            return new Tensor(dtype, shape, d);
        }
        if (DType == DType.Float64 && dtype == DType.Float16)
        {
            double[] src = (double[])Data;
            var h = new Half[src.Length];
            for (int i = 0; i < src.Length; i++) h[i] = (Half)src[i];
            return new Tensor(dtype, shape, h);
        }
        float[] single = ToSingleArray();
        return dtype switch
        {
            DType.Float32 => new Tensor(dtype, shape, single),
            DType.Float16 => FromSingle(single, shape, static (s, d) => ElementConvert.ToHalf(s, d), new Half[single.Length]),
            DType.BFloat16 => FromSingle(single, shape, static (s, d) => ElementConvert.ToBFloat16(s, d), new BFloat16[single.Length]),
            _ => throw new ArgumentOutOfRangeException(nameof(dtype)),
        };
    }

    private static Tensor FromSingle<T>(float[] single, int[] shape, SpanConverter<T> convert, T[] destination) where T : unmanaged
    {
        convert(single, destination);
        return new Tensor(DTypes.Of<T>(), shape, destination);
    }

    private delegate void SpanConverter<T>(ReadOnlySpan<float> source, Span<T> destination);

    /// <summary>"f32[1, 8192, 4, 64]".</summary>
    public override string ToString() => $"{DTypes.Name(DType)}{TensorView<float>.FormatShape<int>([.. Shape])}";
}
