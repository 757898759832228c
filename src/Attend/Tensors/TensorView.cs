using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Attend.Tensors;

/// <summary>
/// A strided view of elements in managed or native memory. Attention tensors are heads-last
/// <c>[batch, seq, heads, headDim]</c> (FlashAttention's and NATTEN's layout); strides are in elements, any
/// permutation is accepted (a <c>[B, H, S, D]</c> buffer is a <c>[B, S, H, D]</c> view with permuted strides, see
/// <see cref="Permute"/>). Strides must be non-negative; a stride of 0 broadcasts.
/// </summary>
/// <typeparam name="T">float, <see cref="Half"/>, <see cref="BFloat16"/> or double.</typeparam>
public readonly unsafe struct TensorView<T> where T : unmanaged
{
    private readonly T[]? _array;
    private readonly T* _pointer;
    private readonly long _offset;
    private readonly int[]? _shape;
    private readonly long[]? _strides;

    /// <summary>A contiguous (C-order) view of <paramref name="data"/> with the given shape.</summary>
    public TensorView(T[] data, params int[] shape)
        : this(data, 0, shape, ContiguousStrides(shape))
    {
    }

    /// <summary>A strided view of <paramref name="data"/> starting at element <paramref name="offset"/>.</summary>
    /// <exception cref="ArgumentException">when the view reaches outside the array or a stride is negative.</exception>
    public TensorView(T[] data, long offset, ReadOnlySpan<int> shape, ReadOnlySpan<long> strides)
    {
        ArgumentNullException.ThrowIfNull(data);
        Validate(shape, strides);
        if (offset < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), offset, "offset must be non-negative");
        }
        long end = offset + MaxIndex(shape, strides);
        if (ElementCountOf(shape) > 0 && end >= data.LongLength)
        {
            throw new ArgumentException(
                $"a view of shape {FormatShape(shape)} with strides {FormatShape(strides)} at offset {offset} reaches element {end}; the array has {data.LongLength}",
                nameof(data));
        }
        _array = data;
        _offset = offset;
        _shape = shape.ToArray();
        _strides = strides.ToArray();
    }

    /// <summary>A strided view of native memory. The caller keeps the memory alive and large enough.</summary>
    public TensorView(T* pointer, ReadOnlySpan<int> shape, ReadOnlySpan<long> strides)
    {
        Validate(shape, strides);
        if (pointer == null && ElementCountOf(shape) > 0)
        {
            throw new ArgumentNullException(nameof(pointer));
        }
        _pointer = pointer;
        _shape = shape.ToArray();
        _strides = strides.ToArray();
    }

    private TensorView(T[]? array, T* pointer, long offset, int[] shape, long[] strides)
    {
        _array = array;
        _pointer = pointer;
        _offset = offset;
        _shape = shape;
        _strides = strides;
    }

    /// <summary>True for <c>default(TensorView&lt;T&gt;)</c>: no memory, no shape.</summary>
    public bool IsDefault => _shape is null;

    /// <summary>Number of dimensions.</summary>
    public int Rank => _shape?.Length ?? 0;

    /// <summary>Extent of each dimension.</summary>
    public ReadOnlySpan<int> Shape => _shape;

    /// <summary>Stride of each dimension, in elements.</summary>
    public ReadOnlySpan<long> Strides => _strides;

    /// <summary>Product of the shape.</summary>
    public long ElementCount => _shape is null ? 0 : ElementCountOf(_shape);

    /// <summary>True when the view is backed by a managed array.</summary>
    public bool IsManaged => _array is not null;

    /// <summary>Extent of dimension <paramref name="axis"/>.</summary>
    public int Dim(int axis) => _shape![axis];

    /// <summary>Stride of dimension <paramref name="axis"/>, in elements.</summary>
    public long Stride(int axis) => _strides![axis];

    /// <summary>The element at a rank-4 index (b, s, h, d).</summary>
    public ref T this[int i0, int i1, int i2, int i3]
    {
        get
        {
            CheckIndex(4, i0, i1, i2, i3);
            return ref At(i0 * _strides![0] + i1 * _strides[1] + i2 * _strides[2] + i3 * _strides[3]);
        }
    }

    /// <summary>The element at a rank-3 index.</summary>
    public ref T this[int i0, int i1, int i2]
    {
        get
        {
            CheckIndex(3, i0, i1, i2, 0);
            return ref At(i0 * _strides![0] + i1 * _strides[1] + i2 * _strides[2]);
        }
    }

    /// <summary>The element at a rank-2 index.</summary>
    public ref T this[int i0, int i1]
    {
        get
        {
            CheckIndex(2, i0, i1, 0, 0);
            return ref At(i0 * _strides![0] + i1 * _strides[1]);
        }
    }

    /// <summary>The element at a rank-1 index.</summary>
    public ref T this[int i0]
    {
        get
        {
            CheckIndex(1, i0, 0, 0, 0);
            return ref At(i0 * _strides![0]);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private ref T At(long elementOffset)
    {
        if (_array is not null)
        {
            return ref Unsafe.Add(ref MemoryMarshal.GetArrayDataReference(_array), (nint)(_offset + elementOffset));
        }
        return ref Unsafe.AsRef<T>(_pointer + elementOffset);
    }

    private void CheckIndex(int rank, int i0, int i1, int i2, int i3)
    {
        if (Rank != rank)
        {
            throw new InvalidOperationException($"a rank-{rank} index on a rank-{Rank} view");
        }
        ReadOnlySpan<int> idx = [i0, i1, i2, i3];
        for (int a = 0; a < rank; a++)
        {
            if ((uint)idx[a] >= (uint)_shape![a])
            {
                throw new IndexOutOfRangeException($"index {idx[a]} on axis {a} of extent {_shape[a]}");
            }
        }
    }

    /// <summary>Copies the innermost vector at rank-4 index (i0, i1, i2, ·) into <paramref name="destination"/>, converting to float.</summary>
    internal void CopyRow(int i0, int i1, int i2, Span<float> destination)
    {
        CheckIndex(4, i0, i1, i2, 0);
        int n = _shape![3];
        if (destination.Length < n) throw new ArgumentException($"destination holds {destination.Length} < {n}", nameof(destination));
        long stride = _strides![3];
        ref T first = ref At(i0 * _strides[0] + i1 * _strides[1] + i2 * _strides[2]);
        if (stride == 1)
        {
            // Contiguous rows (the common layout): one block copy or one vectorized conversion.
            ElementConvert.ToSingle(MemoryMarshal.CreateReadOnlySpan(ref first, n), destination);
            return;
        }
        for (int c = 0; c < n; c++) destination[c] = ElementConvert.ToSingle(Unsafe.Add(ref first, (nint)(c * stride)));
    }

    /// <summary>
    /// Asks the CPU to start loading the innermost vector at rank-4 index (i0, i1, i2, ·); nothing for an index outside
    /// the view or without SSE. One head's rows of [B, S, H, D] lie H·D elements apart, beyond what the hardware
    /// prefetcher follows, so a reader of consecutive rows otherwise waits on memory for every row.
    /// </summary>
    internal unsafe void PrefetchRow(int i0, int i1, int i2)
    {
        if (!System.Runtime.Intrinsics.X86.Sse.IsSupported || Rank != 4 || (uint)i0 >= (uint)_shape![0] || (uint)i1 >= (uint)_shape[1] || (uint)i2 >= (uint)_shape[2]) return;
        long stride = _strides![3] * sizeof(T);
        byte* p = (byte*)Unsafe.AsPointer(ref At((i0 * _strides[0]) + (i1 * _strides[1]) + (i2 * _strides[2])));
        if (stride == sizeof(T))
        {
            long bytes = (long)_shape[3] * sizeof(T);
            for (long line = 0; line < bytes; line += 64) System.Runtime.Intrinsics.X86.Sse.Prefetch0(p + line);
        }
        else
        {
            // Elements apart (a permuted view): one hint per element, never a sweep over the span between them.
            for (int c = 0; c < _shape[3]; c++) System.Runtime.Intrinsics.X86.Sse.Prefetch0(p + (c * stride));
        }
    }

    /// <summary>Writes <paramref name="source"/> (scaled by <paramref name="scale"/>) into the innermost vector at rank-4 index (i0, i1, i2, ·).</summary>
    internal void WriteRow(int i0, int i1, int i2, ReadOnlySpan<float> source, float scale)
    {
        CheckIndex(4, i0, i1, i2, 0);
        int n = _shape![3];
        long stride = _strides![3];
        ref T first = ref At(i0 * _strides[0] + i1 * _strides[1] + i2 * _strides[2]);
        for (int c = 0; c < n; c++) Unsafe.Add(ref first, (nint)(c * stride)) = ElementConvert.FromSingle<T>(source[c] * scale);
    }

    /// <summary>The sub-view of <paramref name="length"/> entries of axis <paramref name="axis"/> from <paramref name="start"/>. No data moves.</summary>
    public TensorView<T> Slice(int axis, int start, int length)
    {
        if ((uint)axis >= (uint)Rank) throw new ArgumentOutOfRangeException(nameof(axis), axis, $"axis must be in 0..{Rank - 1}");
        int extent = _shape![axis];
        if (start < 0 || length < 0 || start > extent - length)
        {
            throw new ArgumentOutOfRangeException(nameof(start), $"slice [{start}, {start}+{length}) is outside axis {axis} of extent {extent}");
        }
        int[] shape = [.. _shape];
        shape[axis] = length;
        return new TensorView<T>(_array, _pointer, _offset + (start * _strides![axis]), shape, [.. _strides]);
    }

    /// <summary>Reorders the axes: result axis i is this view's axis <c>axes[i]</c>. No data moves.</summary>
    /// <example><c>new TensorView&lt;float&gt;(buf, B, H, S, D).Permute(0, 2, 1, 3)</c> is the heads-last view of a [B,H,S,D] buffer.</example>
    public TensorView<T> Permute(params int[] axes)
    {
        ArgumentNullException.ThrowIfNull(axes);
        int rank = Rank;
        if (axes.Length != rank || axes.Distinct().Count() != rank || axes.Any(a => a < 0 || a >= rank))
        {
            throw new ArgumentException($"axes must be a permutation of 0..{Rank - 1}; got [{string.Join(", ", axes)}]", nameof(axes));
        }
        int[] srcShape = _shape!;
        long[] srcStrides = _strides!;
        int[] shape = axes.Select(a => srcShape[a]).ToArray();
        long[] strides = axes.Select(a => srcStrides[a]).ToArray();
        return new TensorView<T>(_array, _pointer, _offset, shape, strides);
    }

    /// <summary>A view with one more axis of extent 1 and stride 0 inserted at <paramref name="axis"/>.</summary>
    public TensorView<T> Unsqueeze(int axis)
    {
        if (axis < 0 || axis > Rank)
        {
            throw new ArgumentOutOfRangeException(nameof(axis), axis, $"must be in 0..{Rank}");
        }
        List<int> shape = [.. _shape!];
        List<long> strides = [.. _strides!];
        shape.Insert(axis, 1);
        strides.Insert(axis, 0);
        return new TensorView<T>(_array, _pointer, _offset, [.. shape], [.. strides]);
    }

    /// <summary>Copies the elements to a new C-order array.</summary>
    public T[] ToArray()
    {
        var result = new T[ElementCount];
        int i = 0;
        TensorView<T> self = this;
        ForEachOffset(off => result[i++] = self.At(off));
        return result;
    }

    /// <summary>Calls <paramref name="action"/> with the element offset of every element in C order.</summary>
    internal void ForEachOffset(Action<long> action)
    {
        if (ElementCount == 0)
        {
            return;
        }
        int rank = Rank;
        Span<int> index = stackalloc int[Math.Max(rank, 1)];
        long offset = 0;
        while (true)
        {
            action(offset);
            int a = rank - 1;
            while (a >= 0)
            {
                index[a]++;
                offset += _strides![a];
                if (index[a] < _shape![a])
                {
                    break;
                }
                offset -= _strides[a] * _shape[a];
                index[a] = 0;
                a--;
            }
            if (a < 0)
            {
                return;
            }
        }
    }

    /// <summary>Pins the memory for the duration of a kernel call; <see cref="PinnedView{T}.Pointer"/> addresses element [0,…,0].</summary>
    internal PinnedView<T> Pin()
    {
        if (_array is null)
        {
            return new PinnedView<T>(_pointer, default);
        }
        GCHandle handle = GCHandle.Alloc(_array, GCHandleType.Pinned);
        T* basePointer = (T*)handle.AddrOfPinnedObject() + _offset;
        return new PinnedView<T>(basePointer, handle);
    }

    /// <summary>The byte range [start, end) that the view can touch, for aliasing checks; null when empty.</summary>
    internal (object? Owner, long Start, long End)? Footprint()
    {
        if (ElementCount == 0)
        {
            return null;
        }
        long last = MaxIndex(_shape!, _strides!);
        if (_array is not null)
        {
            return (_array, _offset * sizeof(T), (_offset + last + 1) * sizeof(T));
        }
        return (null, (long)_pointer, (long)(_pointer + last + 1));
    }

    /// <summary>True when this view and <paramref name="other"/> may touch the same memory.</summary>
    internal bool Overlaps<TOther>(in TensorView<TOther> other) where TOther : unmanaged
    {
        var a = Footprint();
        var b = other.Footprint();
        if (a is null || b is null || !ReferenceEquals(a.Value.Owner, b.Value.Owner))
        {
            return false;
        }
        return a.Value.Start < b.Value.End && b.Value.Start < a.Value.End;
    }

    /// <summary>"[2, 4096, 8, 128]".</summary>
    public string ShapeString() => _shape is null ? "(default)" : FormatShape(_shape);

    /// <inheritdoc/>
    public override string ToString() => $"TensorView<{typeof(T).Name}>{ShapeString()}";

    /// <summary>C-order strides for a shape.</summary>
    public static long[] ContiguousStrides(ReadOnlySpan<int> shape)
    {
        var strides = new long[shape.Length];
        long s = 1;
        for (int a = shape.Length - 1; a >= 0; a--)
        {
            strides[a] = s;
            s *= shape[a];
        }
        return strides;
    }

    internal static string FormatShape<TN>(ReadOnlySpan<TN> shape)
    {
        var sb = new StringBuilder("[");
        for (int i = 0; i < shape.Length; i++)
        {
            if (i > 0) sb.Append(", ");
            sb.Append(shape[i]);
        }
        return sb.Append(']').ToString();
    }

    private static long ElementCountOf(ReadOnlySpan<int> shape)
    {
        long n = 1;
        foreach (int d in shape) n *= d;
        return n;
    }

    private static long MaxIndex(ReadOnlySpan<int> shape, ReadOnlySpan<long> strides)
    {
        long m = 0;
        for (int a = 0; a < shape.Length; a++)
        {
            if (shape[a] > 0) m += (shape[a] - 1) * strides[a];
        }
        return m;
    }

    private static void Validate(ReadOnlySpan<int> shape, ReadOnlySpan<long> strides)
    {
        if (shape.Length != strides.Length)
        {
            throw new ArgumentException($"shape {FormatShape(shape)} and strides {FormatShape(strides)} must have the same rank", nameof(strides));
        }
        for (int a = 0; a < shape.Length; a++)
        {
            if (shape[a] < 0)
            {
                throw new ArgumentException($"shape must be non-negative; got {FormatShape(shape)}", nameof(shape));
            }
            if (strides[a] < 0)
            {
                throw new ArgumentException($"strides must be non-negative; got {FormatShape(strides)}", nameof(strides));
            }
        }
    }
}

/// <summary>A pinned base pointer of a view; dispose to unpin.</summary>
internal readonly unsafe struct PinnedView<T> : IDisposable where T : unmanaged
{
    private readonly GCHandle _handle;

    public PinnedView(T* pointer, GCHandle handle)
    {
        Pointer = pointer;
        _handle = handle;
    }

    public T* Pointer { get; }

    public void Dispose()
    {
        if (_handle.IsAllocated)
        {
            _handle.Free();
        }
    }
}
