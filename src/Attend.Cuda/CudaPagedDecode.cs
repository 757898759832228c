using System.Runtime.InteropServices;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// One sequence's KV cache in device memory, paged as the CPU's <see cref="Decode.KvCache"/>: pools of 64-token
/// pages [pages, 64, Hkv, D] (bf16 or f16) in any order, a page table mapping the sequence's logical pages to pool
/// pages, and per pool page the channel-wise key min/max Quest needs (computed on the device when the pages arrive).
/// </summary>
public sealed unsafe class DevicePagedCache<T> : IDisposable where T : unmanaged
{
    /// <summary>Tokens per page (the decode kernel's key tile).</summary>
    public const int PageSize = 64;

    private DevicePagedCache(DeviceBuffer<T> k, DeviceBuffer<T> v, int[] table, int length, int kvHeads, int headDim)
    {
        K = k;
        V = v;
        Length = length;
        KvHeads = kvHeads;
        HeadDim = headDim;
        Pages = table.Length;
        Table = DeviceBuffer<int>.Allocate(table.Length);
        Table.CopyFrom(table);
        Min = DeviceBuffer<float>.Allocate((long)Pages * kvHeads * headDim);
        Max = DeviceBuffer<float>.Allocate((long)Pages * kvHeads * headDim);
        int lastPool = table[^1], lastLength = length - ((Pages - 1) * PageSize);
        var p = new SummaryParams
        {
            K = K.Pointer, Min = Min.Pointer, Max = Max.Pointer, PageStride = PageStride, RowStride = (long)kvHeads * headDim, HeadStride = headDim,
            Pages = Pages, KvHeads = kvHeads, D = headDim, Page = PageSize, LastPage = lastPool, LastLength = lastLength,
        };
        void* arg = &p;
        CudaBackend.Device.Kernel("select.cu", "page_summaries", Defines).Launch((uint)Pages, (uint)kvHeads, 1, 256, 0, &arg);
    }

    /// <summary>
    /// The cache of k, v [1, S, Hkv, D] (host), its pages stored in the pool in <paramref name="poolOrder"/> (pool slot of
    /// each logical page, a permutation; default in order) — the layout a paged allocator leaves behind.
    /// </summary>
    public static DevicePagedCache<T> FromHost(TensorView<T> k, TensorView<T> v, int[]? poolOrder = null)
    {
        if (typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16)) throw new NotSupportedException($"the paged GPU cache holds bf16 or f16; got {typeof(T).Name}");
        if (k.Rank != 4 || k.Dim(0) != 1) throw new ArgumentException($"k must be [1, S, Hkv, D]; got {TensorView<T>.FormatShape<int>(k.Shape)}", nameof(k));
        if (!v.Shape.SequenceEqual(k.Shape)) throw new ArgumentException($"v must have k's shape {TensorView<T>.FormatShape<int>(k.Shape)}; got {TensorView<T>.FormatShape<int>(v.Shape)}", nameof(v));
        int s = k.Dim(1), hkv = k.Dim(2), d = k.Dim(3), pages = (s + PageSize - 1) / PageSize;
        if (s < 1) throw new ArgumentException("k has no tokens", nameof(k));
        if (d > 256 || d % 8 != 0) throw new NotSupportedException($"GPU decoding needs D ≤ 256 and a multiple of 8; got {d}");
        poolOrder ??= [.. Enumerable.Range(0, pages)];
        if (poolOrder.Length != pages || !poolOrder.Order().SequenceEqual(Enumerable.Range(0, pages)))
        {
            throw new ArgumentException($"poolOrder must be a permutation of the {pages} pages", nameof(poolOrder));
        }
        long pageElements = (long)PageSize * hkv * d;
        var kHost = new T[pages * pageElements];
        var vHost = new T[pages * pageElements];
        for (int j = 0; j < s; j++)
            for (int h = 0; h < hkv; h++)
            {
                int at = (int)((poolOrder[j / PageSize] * pageElements) + ((((long)(j % PageSize) * hkv) + h) * d));
                CopyRow(k, j, h, kHost.AsSpan(at, d));
                CopyRow(v, j, h, vHost.AsSpan(at, d));
            }
        DeviceBuffer<T> kd = DeviceBuffer<T>.Allocate(kHost.Length), vd = DeviceBuffer<T>.Allocate(vHost.Length);
        kd.CopyFrom(kHost);
        vd.CopyFrom(vHost);
        return new DevicePagedCache<T>(kd, vd, poolOrder, s, hkv, d);
    }

    /// <summary>Row (0, j, h) of x into <paramref name="destination"/>: one span copy when the row is contiguous.</summary>
    private static void CopyRow(TensorView<T> x, int j, int h, Span<T> destination)
    {
        if (x.Stride(3) == 1)
        {
            MemoryMarshal.CreateReadOnlySpan(ref x[0, j, h, 0], destination.Length).CopyTo(destination);
            return;
        }
        for (int c = 0; c < destination.Length; c++) destination[c] = x[0, j, h, c];
    }

    /// <summary>Tokens in the sequence.</summary>
    public int Length { get; }

    /// <summary>Logical pages (the last may be partial).</summary>
    public int Pages { get; }

    /// <summary>Key/value heads.</summary>
    public int KvHeads { get; }

    /// <summary>Head dim.</summary>
    public int HeadDim { get; }

    internal long PageStride => (long)PageSize * KvHeads * HeadDim;

    internal DeviceBuffer<T> K { get; }

    internal DeviceBuffer<T> V { get; }

    internal DeviceBuffer<int> Table { get; }

    internal DeviceBuffer<float> Min { get; }

    internal DeviceBuffer<float> Max { get; }

    internal static Dictionary<string, string> Defines => new() { ["SRC_T"] = typeof(T) == typeof(Half) ? "1" : "2" };

    /// <inheritdoc/>
    public void Dispose()
    {
        K.Dispose();
        V.Dispose();
        Table.Dispose();
        Min.Dispose();
        Max.Dispose();
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct SummaryParams
    {
        public ulong K, Min, Max;
        public long PageStride, RowStride, HeadStride;
        public int Pages, KvHeads, D, Page, LastPage, LastLength;
    }
}

/// <summary>
/// Decoding over a <see cref="DevicePagedCache{T}"/>: split-K over pages with the exact LSE merge (the kernel of
/// <see cref="CudaDecode"/> reading each 64-key tile through the page table), GQA-aware, every page or the pages
/// Quest selects on the device (per kv head: page bounds from the key min/max, the last page's set to +∞ so it is always
/// read, and the best ⌊budget / 64⌋ pages by a radix select — ties at the edge taken lowest page first — listed ascending).
/// </summary>
public static unsafe class CudaPagedDecode
{
    private static readonly Lock Gate = new();
    private static DeviceBuffer<float>? _partO, _partLse, _bounds;
    private static DeviceBuffer<int>? _list, _count;

    /// <summary>
    /// q [1, Hq, D] (the new token) against the cache → output [1, Hq, D], optional lse [1, Hq]. With
    /// <paramref name="questTokenBudget"/>, each kv head reads only the pages Quest picks within that many tokens;
    /// otherwise every page.
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, int? questTokenBudget = null, float? scale = null, DeviceTensor<float>? lse = null)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentNullException.ThrowIfNull(output);
        int hkv = cache.KvHeads, d = cache.HeadDim;
        if (q.Rank != 3 || q.Shape[0] != 1 || q.Shape[2] != d || q.Shape[1] % hkv != 0)
        {
            throw new ArgumentException($"q must be [1, Hq (a multiple of Hkv={hkv}), D={d}]; got {q.ShapeString()}", nameof(q));
        }
        int hq = q.Shape[1];
        if (!output.Shape.SequenceEqual(q.Shape)) throw new ArgumentException($"output must be {q.ShapeString()}; got {output.ShapeString()}", nameof(output));
        if (lse is not null && (lse.Rank != 2 || lse.Shape[0] != 1 || lse.Shape[1] != hq)) throw new ArgumentException($"lse must be [1, {hq}]", nameof(lse));
        if (hq / hkv > 16) throw new NotSupportedException($"GPU decoding packs a GQA group into 16 rows; Hq/Hkv = {hq / hkv}");
        if (questTokenBudget is < 1) throw new ArgumentOutOfRangeException(nameof(questTokenBudget), questTokenBudget, "the token budget must be ≥ 1");
        if (q.Strides[2] != 1 || q.Strides[1] % 8 != 0 || output.Strides[2] != 1 || output.Strides[1] % 8 != 0)
        {
            throw new NotSupportedException("GPU decoding needs D contiguous and 16-byte aligned rows");
        }
        float sc = scale ?? 1f / MathF.Sqrt(d);
        if (!(sc > 0) || !float.IsFinite(sc)) throw new ArgumentException($"scale must be finite and > 0; got {sc}", nameof(scale));

        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        FlashConfig config = FlashConfig.For(d);
        int pages = cache.Pages;
        int keep = questTokenBudget is { } budget ? Math.Clamp(budget / DevicePagedCache<T>.PageSize, 1, pages) : pages;
        int shared = (16 + 4 * 16 * config.Warps) * config.HeadDim * 2;
        int splitsWanted = Math.Max(1, device.Multiprocessors * 2 / hkv);
        int perSplit = Math.Max(1, (keep + splitsWanted - 1) / splitsWanted), splits = (keep + perSplit - 1) / perSplit;
        Dictionary<string, string> defines = config.Defines(typeof(T) == typeof(BFloat16), false, false);
        lock (Gate)
        {
            DeviceBuffer<float>.EnsureLength(ref _partO, (long)hq * splits * config.HeadDim);
            DeviceBuffer<float>.EnsureLength(ref _partLse, (long)hq * splits);
            DeviceBuffer<float>.EnsureLength(ref _bounds, (long)hkv * pages);
            DeviceBuffer<int>.EnsureLength(ref _list, (long)hkv * pages);
            DeviceBuffer<int>.EnsureLength(ref _count, hkv);
            if (keep < pages)
            {
                var qp = new QuestParams
                {
                    Q = q.Buffer.Pointer, Min = cache.Min.Pointer, Max = cache.Max.Pointer, Table = cache.Table.Pointer,
                    Bounds = _bounds!.Pointer, QHead = q.Strides[1], Pages = pages, KvHeads = hkv, Group = hq / hkv, D = d,
                };
                void* qarg = &qp;
                device.Kernel("select.cu", "quest_bounds", DevicePagedCache<T>.Defines).Launch((uint)((pages * hkv + 7) / 8), 1, 1, 256, 0, &qarg);
                CudaSelectors.TopK(_bounds.Pointer, pages, keep, _list!.Pointer, pages, _count!.Pointer, hkv, DevicePagedCache<T>.Defines);
                _allPages = null;   // the list now holds a selection
            }
            else
            {
                AllPages(hkv, pages);
            }
            var p = new CudaDecode.DecodeParams
            {
                Q = q.Buffer.Pointer, K = cache.K.Pointer, V = cache.V.Pointer, O = output.Buffer.Pointer, Lse = lse?.Buffer.Pointer ?? 0,
                PartO = _partO!.Pointer, PartLse = _partLse!.Pointer,
                QHead = q.Strides[1], KRow = (long)hkv * d, KHead = d, VRow = (long)hkv * d, VHead = d, OHead = output.Strides[1], LseHead = lse?.Strides[1] ?? 0,
                SeqlenK = cache.Length, Heads = hq, Group = hq / hkv, HeadDim = d, SplitLen = 0, Splits = splits, ScaleLog2 = sc * 1.4426950408889634f,
                PageTable = cache.Table.Pointer, PageList = _list!.Pointer, PageCount = _count!.Pointer, PageStride = cache.PageStride,
                TableStride = pages, ListStride = pages, PagesPerSplit = perSplit,
            };
            void* arg = &p;
            device.Kernel("flash_fwd.cu", "flash_decode", defines).Launch((uint)splits, (uint)hkv, 1, (uint)(config.Warps * 32), shared, &arg);
            device.Kernel("flash_fwd.cu", "decode_merge", defines).Launch((uint)hq, 1, 1, (uint)Math.Min(256, (d + 31) / 32 * 32), 0, &arg);
        }
    }

    /// <summary>What the list buffer holds when it lists every page: (buffer, kv heads, pages); null after a selection.</summary>
    private static (DeviceBuffer<int> List, int Heads, int Pages)? _allPages;

    /// <summary>The list of every page for every kv head (uploaded only when the buffer or the shape changed).</summary>
    private static void AllPages(int hkv, int pages)
    {
        if (_allPages is { } held && ReferenceEquals(held.List, _list) && held.Heads == hkv && held.Pages == pages) return;
        var list = new int[hkv * pages];
        for (int h = 0; h < hkv; h++)
            for (int i = 0; i < pages; i++) list[(h * pages) + i] = i;
        _list!.CopyFrom(list);
        _count!.CopyFrom([.. Enumerable.Repeat(pages, hkv)]);
        _allPages = (_list, hkv, pages);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct QuestParams
    {
        public ulong Q, Min, Max, Table, Bounds;
        public long QHead;
        public int Pages, KvHeads, Group, D;
    }
}
