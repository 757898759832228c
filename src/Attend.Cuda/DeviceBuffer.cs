using System.Runtime.InteropServices;
using Attend.Cuda.Interop;

namespace Attend.Cuda;

/// <summary>Device memory of <see cref="Length"/> elements of <typeparamref name="T"/>; free it with <c>using</c>/Dispose.</summary>
public sealed unsafe class DeviceBuffer<T> : SafeHandle where T : unmanaged
{
    private DeviceBuffer(ulong pointer, long length) : base(0, ownsHandle: true)
    {
        SetHandle((nint)pointer);
        Length = length;
    }

    /// <summary>Allocates <paramref name="length"/> elements (uninitialized).</summary>
    /// <exception cref="CudaException">CUDA_ERROR_OUT_OF_MEMORY and other driver errors.</exception>
    public static DeviceBuffer<T> Allocate(long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        CudaBackend.Device.MakeCurrent();
        ulong p = 0;
        if (length > 0)
        {
            Driver.Check(Driver.cuMemAlloc(&p, (nuint)(length * sizeof(T))), $"cuMemAlloc({length * sizeof(T)} bytes)");
        }
        DeviceMemory.Allocated();
        return new DeviceBuffer<T>(p, length);
    }

    /// <summary>Elements.</summary>
    public long Length { get; }

    /// <summary>Bytes.</summary>
    public long Bytes => Length * sizeof(T);

    /// <summary>The device address.</summary>
    public ulong Pointer => (ulong)handle;

    /// <inheritdoc/>
    public override bool IsInvalid => false;

    /// <summary>A workspace kept between calls: replaced by a larger one when it holds fewer than <paramref name="length"/> elements.</summary>
    internal static void EnsureLength(ref DeviceBuffer<T>? buffer, long length)
    {
        if (buffer is not null && buffer.Length >= length) return;
        buffer?.Dispose();
        buffer = Allocate(Math.Max(length, 1));
    }

    /// <summary>Copies host elements to the start of the buffer.</summary>
    public void CopyFrom(ReadOnlySpan<T> source)
    {
        if (source.Length > Length) throw new ArgumentException($"source has {source.Length} elements; the buffer holds {Length}", nameof(source));
        if (source.IsEmpty) return;
        CudaBackend.Device.MakeCurrent();
        fixed (T* s = source) Driver.Check(Driver.cuMemcpyHtoD(Pointer, s, (nuint)(source.Length * sizeof(T))), "cuMemcpyHtoD");
    }

    /// <summary>Copies <paramref name="count"/> elements from element <paramref name="source"/> to element <paramref name="destination"/> of this buffer, on the device (ordered with the kernels).</summary>
    internal void CopyWithin(long source, long destination, long count)
    {
        if (source < 0 || destination < 0 || count < 0 || source + count > Length || destination + count > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), $"elements {source}..{source + count} → {destination}..{destination + count} are outside the buffer's {Length}");
        }
        if (count == 0) return;
        CudaBackend.Device.MakeCurrent();
        Driver.Check(Driver.cuMemcpyDtoD(Pointer + (ulong)(destination * sizeof(T)), Pointer + (ulong)(source * sizeof(T)), (nuint)(count * sizeof(T))), "cuMemcpyDtoD");
    }

    /// <summary>Copies host elements into the buffer from element <paramref name="offset"/> on.</summary>
    public void CopyFrom(ReadOnlySpan<T> source, long offset)
    {
        if (offset < 0 || offset + source.Length > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"elements {offset}..{offset + source.Length} are outside the buffer's {Length}");
        }
        if (source.IsEmpty) return;
        CudaBackend.Device.MakeCurrent();
        fixed (T* s = source) Driver.Check(Driver.cuMemcpyHtoD(Pointer + (ulong)(offset * sizeof(T)), s, (nuint)(source.Length * sizeof(T))), "cuMemcpyHtoD");
    }

    /// <summary>Copies the first destination.Length elements to the host.</summary>
    public void CopyTo(Span<T> destination)
    {
        if (destination.Length > Length) throw new ArgumentException($"destination has {destination.Length} elements; the buffer holds {Length}", nameof(destination));
        if (destination.IsEmpty) return;
        CudaBackend.Device.MakeCurrent();
        fixed (T* d = destination) Driver.Check(Driver.cuMemcpyDtoH(d, Pointer, (nuint)(destination.Length * sizeof(T))), "cuMemcpyDtoH");
    }

    /// <summary>Copies destination.Length elements starting at element <paramref name="offset"/> to the host.</summary>
    public void CopyTo(Span<T> destination, long offset)
    {
        if (offset < 0 || offset + destination.Length > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"elements {offset}..{offset + destination.Length} are outside the buffer's {Length}");
        }
        if (destination.IsEmpty) return;
        CudaBackend.Device.MakeCurrent();
        fixed (T* d = destination) Driver.Check(Driver.cuMemcpyDtoH(d, Pointer + (ulong)(offset * sizeof(T)), (nuint)(destination.Length * sizeof(T))), "cuMemcpyDtoH");
    }

    /// <summary>Fills the buffer with zero bytes.</summary>
    public void Clear()
    {
        if (Length == 0) return;
        CudaBackend.Device.MakeCurrent();
        Driver.Check(Driver.cuMemsetD8(Pointer, 0, (nuint)Bytes), "cuMemsetD8");
    }

    /// <inheritdoc/>
    protected override bool ReleaseHandle()
    {
        DeviceMemory.Freed();
        if (handle != 0)
        {
            CudaBackend.Device.MakeCurrent();
            return Driver.cuMemFree((ulong)handle) == 0;
        }
        return true;
    }
}

/// <summary>Counts live device buffers of every element type (leak checks).</summary>
public static class DeviceMemory
{
    private static long _live;

    /// <summary>Buffers allocated and not yet freed.</summary>
    public static long LiveBuffers => Interlocked.Read(ref _live);

    internal static void Allocated() => Interlocked.Increment(ref _live);

    internal static void Freed() => Interlocked.Decrement(ref _live);
}
