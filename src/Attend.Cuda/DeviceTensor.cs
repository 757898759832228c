using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// A strided tensor in device memory: a <see cref="DeviceBuffer{T}"/> plus a shape and element strides, the device
/// twin of <see cref="TensorView{T}"/> (heads-last <c>[B, S, H, D]</c> for attention). Owns its buffer unless made
/// with <see cref="View"/>; dispose it to free device memory.
/// </summary>
public sealed class DeviceTensor<T> : IDisposable where T : unmanaged
{
    private readonly int[] _shape;
    private readonly long[] _strides;
    private readonly bool _owns;

    private DeviceTensor(DeviceBuffer<T> buffer, int[] shape, long[] strides, bool owns)
    {
        Buffer = buffer;
        _shape = shape;
        _strides = strides;
        _owns = owns;
    }

    /// <summary>The memory.</summary>
    public DeviceBuffer<T> Buffer { get; }

    /// <summary>Extent of each dimension.</summary>
    public ReadOnlySpan<int> Shape => _shape;

    /// <summary>Stride of each dimension in elements.</summary>
    public ReadOnlySpan<long> Strides => _strides;

    /// <summary>Number of dimensions.</summary>
    public int Rank => _shape.Length;

    /// <summary>Product of the shape.</summary>
    public long ElementCount => _shape.Aggregate(1L, (a, d) => a * d);

    /// <summary>"[1, 4096, 32, 128]".</summary>
    public string ShapeString() => TensorView<T>.FormatShape<int>(_shape);

    /// <summary>A new contiguous (C-order) tensor, uninitialized.</summary>
    public static DeviceTensor<T> Allocate(params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(shape);
        if (shape.Any(d => d < 0)) throw new ArgumentException($"shape must be non-negative; got {TensorView<T>.FormatShape<int>(shape)}", nameof(shape));
        long count = shape.Aggregate(1L, (a, d) => a * d);
        return new DeviceTensor<T>(DeviceBuffer<T>.Allocate(count), (int[])shape.Clone(), TensorView<T>.ContiguousStrides(shape), owns: true);
    }

    /// <summary>A contiguous device copy of a host view (any strides).</summary>
    public static DeviceTensor<T> FromHost(TensorView<T> host)
    {
        if (host.IsDefault) throw new ArgumentException("host tensor is missing", nameof(host));
        DeviceTensor<T> t = Allocate(host.Shape.ToArray());
        try
        {
            t.Buffer.CopyFrom(host.ToArray());
        }
        catch
        {
            t.Dispose();
            throw;
        }
        return t;
    }

    /// <summary>A view of an existing buffer with other shape/strides (does not own it).</summary>
    public static DeviceTensor<T> View(DeviceBuffer<T> buffer, ReadOnlySpan<int> shape, ReadOnlySpan<long> strides)
    {
        ArgumentNullException.ThrowIfNull(buffer);
        if (shape.Length != strides.Length) throw new ArgumentException("shape and strides must have the same rank", nameof(strides));
        long last = 0;
        for (int i = 0; i < shape.Length; i++)
        {
            if (shape[i] < 0 || strides[i] < 0) throw new ArgumentException("shape and strides must be non-negative", nameof(shape));
            if (shape[i] > 0) last += (shape[i] - 1) * strides[i];
        }
        bool empty = shape.ToArray().Any(d => d == 0);
        if (!empty && last >= buffer.Length)
        {
            throw new ArgumentException($"a view of shape {TensorView<T>.FormatShape(shape)} reaches element {last}; the buffer holds {buffer.Length}", nameof(shape));
        }
        return new DeviceTensor<T>(buffer, shape.ToArray(), strides.ToArray(), owns: false);
    }

    /// <summary>Reorders axes (no data moves); the result shares (does not own) the buffer.</summary>
    public DeviceTensor<T> Permute(params int[] axes)
    {
        ArgumentNullException.ThrowIfNull(axes);
        if (axes.Length != Rank || axes.Distinct().Count() != Rank || axes.Any(a => a < 0 || a >= Rank))
        {
            throw new ArgumentException($"axes must be a permutation of 0..{Rank - 1}", nameof(axes));
        }
        return new DeviceTensor<T>(Buffer, axes.Select(a => _shape[a]).ToArray(), axes.Select(a => _strides[a]).ToArray(), owns: false);
    }

    /// <summary>Copies to a new host array in C order of this tensor's shape (contiguous tensors only).</summary>
    public T[] ToHost()
    {
        if (!IsContiguous) throw new InvalidOperationException($"ToHost needs a contiguous tensor; strides are {TensorView<T>.FormatShape<long>(_strides)}");
        var result = new T[ElementCount];
        Buffer.CopyTo(result);
        return result;
    }

    /// <summary>True when the strides are C-order for the shape.</summary>
    public bool IsContiguous => TensorView<T>.ContiguousStrides(_shape).AsSpan().SequenceEqual(_strides);

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_owns) Buffer.Dispose();
    }
}
