using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Attend.Cpu;

/// <summary>
/// A large float buffer handed from one executor call to the next. The CPU executor packs every key and value into
/// panels per call (16 MB at S = 8192, 4 kv heads, D = 64); a fresh native block each time cost a page fault per
/// 4 KB on every call (with the element-wise pack, 7–9 ms of a 230 ms dense causal call on the 2-core EPYC; with this
/// buffer and the vector pack 3.5–4.6 ms; docs/perf/sparse.md, session 11). The buffer is a pinned array held through a weak reference, so the GC
/// reclaims it under memory pressure and an idle process does not keep it; concurrent callers that find the slot
/// empty allocate their own. Sizes beyond an array's limit use native memory, not cached.
/// </summary>
internal sealed unsafe class PinnedScratch : IDisposable
{
    private static readonly Lock Gate = new();
    private static readonly WeakReference<float[]?> Last = new(null);

    private readonly float[]? _array;
    private readonly void* _native;

    /// <summary>A buffer of at least <paramref name="length"/> floats at a 64-byte aligned <see cref="Pointer"/>; contents undefined.</summary>
    public PinnedScratch(long length)
    {
        long needed = length + 16;   // room to align to 64 bytes
        if (needed > Array.MaxLength)
        {
            _native = NativeMemory.AlignedAlloc((nuint)(length * sizeof(float)), 64);
            Pointer = (float*)_native;
            return;
        }
        lock (Gate)
        {
            if (Last.TryGetTarget(out float[]? cached) && cached.LongLength >= needed)
            {
                _array = cached;
                Last.SetTarget(null);
            }
        }
        _array ??= GC.AllocateUninitializedArray<float>((int)needed, pinned: true);
        nint start = (nint)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_array));
        Pointer = (float*)((start + 63) & ~(nint)63);
    }

    /// <summary>Start of the buffer, 64-byte aligned.</summary>
    public float* Pointer { get; }

    /// <summary>Offers the array to the next call (a larger one stays cached over a smaller one).</summary>
    public void Dispose()
    {
        if (_native != null)
        {
            NativeMemory.AlignedFree(_native);
            return;
        }
        lock (Gate)
        {
            if (!Last.TryGetTarget(out float[]? cached) || cached.LongLength < _array!.LongLength) Last.SetTarget(_array);
        }
    }
}
