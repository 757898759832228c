using System.Runtime.InteropServices;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// One sequence's KV cache in device memory, paged as the CPU's <see cref="Decode.KvCache"/>: pools of 64-token
/// pages [pages, 64, Hkv, D] (bf16 or f16) in any order, a page table mapping the sequence's logical pages to pool
/// pages, and per pool page the channel-wise key min/max Quest needs and the mean key Landmark needs (computed on the device when the pages arrive).
/// The pool has a fixed capacity; <see cref="Append(TensorView{T}, TensorView{T})"/> adds tokens (generation) into the
/// last page and fresh pool pages, updating the table and the touched pages' summaries.
/// </summary>
public sealed unsafe class DevicePagedCache<T> : IDisposable where T : unmanaged
{
    /// <summary>Tokens per page (the decode kernel's key tile).</summary>
    public const int PageSize = 64;

    private readonly int[] _table;   // logical → pool page, CapacityPages entries (the first Pages in use)
    private int _poolUsed;           // pool pages handed out

    private DevicePagedCache(int kvHeads, int headDim, int capacityPages)
    {
        KvHeads = kvHeads;
        HeadDim = headDim;
        CapacityPages = capacityPages;
        long elements = capacityPages * PageStride;
        _table = new int[capacityPages];
        K = DeviceBuffer<T>.Allocate(elements);
        try
        {
            V = DeviceBuffer<T>.Allocate(elements);
            Table = DeviceBuffer<int>.Allocate(capacityPages);
            Min = DeviceBuffer<float>.Allocate((long)capacityPages * kvHeads * headDim);
            Max = DeviceBuffer<float>.Allocate((long)capacityPages * kvHeads * headDim);
            Mean = DeviceBuffer<float>.Allocate((long)capacityPages * kvHeads * headDim);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>An empty cache for <paramref name="kvHeads"/> heads of <paramref name="headDim"/> with room for <paramref name="capacityTokens"/> tokens.</summary>
    public static DevicePagedCache<T> Create(int kvHeads, int headDim, int capacityTokens)
    {
        CheckType();
        if (kvHeads < 1) throw new ArgumentOutOfRangeException(nameof(kvHeads), kvHeads, "kvHeads must be ≥ 1");
        CheckHeadDim(headDim);
        if (capacityTokens < 1) throw new ArgumentOutOfRangeException(nameof(capacityTokens), capacityTokens, "capacityTokens must be ≥ 1");
        return new DevicePagedCache<T>(kvHeads, headDim, (capacityTokens + PageSize - 1) / PageSize);
    }

    /// <summary>
    /// The cache of k, v [1, S, Hkv, D] (host), its pages stored in the pool in <paramref name="poolOrder"/> (pool slot of
    /// each logical page, a permutation; default in order) — the layout a paged allocator leaves behind — with room for
    /// <paramref name="capacityTokens"/> tokens in all (default: just these).
    /// </summary>
    public static DevicePagedCache<T> FromHost(TensorView<T> k, TensorView<T> v, int[]? poolOrder = null, int capacityTokens = 0)
    {
        CheckType();
        if (k.Rank != 4 || k.Dim(0) != 1) throw new ArgumentException($"k must be [1, S, Hkv, D]; got {TensorView<T>.FormatShape<int>(k.Shape)}", nameof(k));
        if (!v.Shape.SequenceEqual(k.Shape)) throw new ArgumentException($"v must have k's shape {TensorView<T>.FormatShape<int>(k.Shape)}; got {TensorView<T>.FormatShape<int>(v.Shape)}", nameof(v));
        int s = k.Dim(1), hkv = k.Dim(2), d = k.Dim(3), pages = (s + PageSize - 1) / PageSize;
        if (s < 1) throw new ArgumentException("k has no tokens", nameof(k));
        CheckHeadDim(d);
        poolOrder ??= [.. Enumerable.Range(0, pages)];
        if (poolOrder.Length != pages || !poolOrder.Order().SequenceEqual(Enumerable.Range(0, pages)))
        {
            throw new ArgumentException($"poolOrder must be a permutation of the {pages} pages", nameof(poolOrder));
        }
        var cache = new DevicePagedCache<T>(hkv, d, Math.Max(pages, (capacityTokens + PageSize - 1) / PageSize));
        try
        {
            long pageElements = cache.PageStride;
            var kHost = new T[pages * pageElements];
            var vHost = new T[pages * pageElements];
            for (int j = 0; j < s; j++)
                for (int h = 0; h < hkv; h++)
                {
                    int at = (int)((poolOrder[j / PageSize] * pageElements) + ((((long)(j % PageSize) * hkv) + h) * d));
                    CopyRow(k, j, h, kHost.AsSpan(at, d));
                    CopyRow(v, j, h, vHost.AsSpan(at, d));
                }
            cache.K.CopyFrom(kHost);
            cache.V.CopyFrom(vHost);
            poolOrder.CopyTo(cache._table, 0);
            cache._poolUsed = pages;
            cache.Commit(s, 0, pages);
            return cache;
        }
        catch
        {
            cache.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Appends k, v [1, n, Hkv, D] (host) after the cached tokens: into the last page while it has room, then into fresh
    /// pool pages. Everything is checked before anything is written, so a rejected append leaves the cache as it was.
    /// </summary>
    public void Append(TensorView<T> k, TensorView<T> v)
    {
        if (k.Rank != 4 || k.Dim(0) != 1 || k.Dim(2) != KvHeads || k.Dim(3) != HeadDim)
        {
            throw new ArgumentException($"k must be [1, n, {KvHeads}, {HeadDim}]; got {TensorView<T>.FormatShape<int>(k.Shape)}", nameof(k));
        }
        if (!v.Shape.SequenceEqual(k.Shape)) throw new ArgumentException($"v must have k's shape {TensorView<T>.FormatShape<int>(k.Shape)}; got {TensorView<T>.FormatShape<int>(v.Shape)}", nameof(v));
        int n = k.Dim(1);
        if (n < 1) throw new ArgumentException("k has no tokens", nameof(k));
        long newLength = (long)Length + n;
        if (newLength > (long)CapacityPages * PageSize)
        {
            throw new InvalidOperationException($"appending {n} tokens to {Length} exceeds the cache's capacity of {CapacityPages * PageSize} tokens");
        }
        int oldLength = Length, oldPages = Pages, newPages = (int)((newLength + PageSize - 1) / PageSize);
        int firstTouched = oldLength % PageSize != 0 ? oldPages - 1 : oldPages;   // the partial last page, if any
        for (int page = oldPages; page < newPages; page++) _table[page] = _poolUsed++;
        // Copy page by page: the new tokens of one page are consecutive rows [tokens, Hkv, D] there.
        long rowElements = (long)KvHeads * HeadDim;
        var kRows = new T[Math.Min(n, PageSize) * rowElements];
        var vRows = new T[kRows.Length];
        for (int j0 = 0; j0 < n;)
        {
            int position = oldLength + j0, page = position / PageSize, within = position % PageSize, count = Math.Min(n - j0, PageSize - within);
            for (int j = 0; j < count; j++)
                for (int h = 0; h < KvHeads; h++)
                {
                    int at = (int)(((long)j * rowElements) + ((long)h * HeadDim));
                    CopyRow(k, j0 + j, h, kRows.AsSpan(at, HeadDim));
                    CopyRow(v, j0 + j, h, vRows.AsSpan(at, HeadDim));
                }
            long offset = (_table[page] * PageStride) + (within * rowElements);
            K.CopyFrom(kRows.AsSpan(0, (int)(count * rowElements)), offset);
            V.CopyFrom(vRows.AsSpan(0, (int)(count * rowElements)), offset);
            j0 += count;
        }
        Commit((int)newLength, firstTouched, newPages);
    }

    /// <summary>
    /// Uploads the table entries of the new logical pages, recomputes the summaries of logical pages [firstTouched,
    /// pages) and sets the sizes. (An append that stays within the last page uploads nothing: the generation loop's
    /// common step.)
    /// </summary>
    private void Commit(int length, int firstTouched, int pages)
    {
        Table.CopyFrom(_table.AsSpan(Pages, pages - Pages), Pages);
        int lastPool = _table[pages - 1], lastLength = length - ((pages - 1) * PageSize);
        var p = new SummaryParams
        {
            K = K.Pointer, Min = Min.Pointer, Max = Max.Pointer, Mean = Mean.Pointer, PageStride = PageStride, RowStride = (long)KvHeads * HeadDim, HeadStride = HeadDim,
            KvHeads = KvHeads, D = HeadDim, Page = PageSize, LastPage = lastPool, LastLength = lastLength,
        };
        // The touched logical pages' pool pages, in runs of consecutive slots: one launch per run (all of them at
        // once for a cache built from the host; the old partial page and the fresh ones after an append).
        int[] slots = [.. _table.AsSpan(firstTouched, pages - firstTouched).ToArray().Order()];
        for (int i = 0; i < slots.Length;)
        {
            int run = 1;
            while (i + run < slots.Length && slots[i + run] == slots[i] + run) run++;
            p.FirstPage = slots[i];
            p.Pages = run;
            void* arg = &p;
            CudaBackend.Device.Kernel("select.cu", "page_summaries", Defines).Launch((uint)run, (uint)KvHeads, 1, 256, 0, &arg);
            i += run;
        }
        Length = length;
        Pages = pages;
    }

    /// <summary>
    /// StreamingLLM's pages (Xiao et al., arXiv:2309.17453, as the CPU's StreamingLLM policy): those holding the first
    /// <paramref name="sinkTokens"/> tokens and the last <paramref name="recentTokens"/>, ascending — for
    /// <see cref="CudaPagedDecode.Forward{T}(DeviceTensor{T}, DevicePagedCache{T}, DeviceTensor{T}, IReadOnlyList{IReadOnlyList{int}}, float?, DeviceTensor{float}?)"/>.
    /// </summary>
    public IReadOnlyList<int> SinkAndRecentPages(int sinkTokens, int recentTokens)
    {
        if (sinkTokens < 0) throw new ArgumentOutOfRangeException(nameof(sinkTokens), sinkTokens, "sinkTokens must be ≥ 0");
        if (recentTokens < 0) throw new ArgumentOutOfRangeException(nameof(recentTokens), recentTokens, "recentTokens must be ≥ 0");
        if (sinkTokens + recentTokens == 0) throw new ArgumentException("sinkTokens + recentTokens must be ≥ 1");
        if (Length == 0) throw new InvalidOperationException("the cache is empty");
        var pages = new SortedSet<int>();
        for (int page = 0; page < Math.Min(Pages, (sinkTokens + PageSize - 1) / PageSize); page++) pages.Add(page);
        for (int page = Math.Max(0, Length - recentTokens) / PageSize; page < Pages && recentTokens > 0; page++) pages.Add(page);
        return [.. pages];
    }

    private static void CheckType()
    {
        if (typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16)) throw new NotSupportedException($"the paged GPU cache holds bf16 or f16; got {typeof(T).Name}");
    }

    private static void CheckHeadDim(int d)
    {
        if (d > 256 || d % 8 != 0 || d < 8) throw new NotSupportedException($"GPU decoding needs D ≤ 256 and a multiple of 8; got {d}");
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
    public int Length { get; private set; }

    /// <summary>Logical pages (the last may be partial).</summary>
    public int Pages { get; private set; }

    /// <summary>Pages the pool holds: the cache's capacity is CapacityPages · <see cref="PageSize"/> tokens.</summary>
    public int CapacityPages { get; }

    /// <summary>Key/value heads.</summary>
    public int KvHeads { get; }

    /// <summary>Head dim.</summary>
    public int HeadDim { get; }

    internal long PageStride => (long)PageSize * KvHeads * HeadDim;

    internal DeviceBuffer<T> K { get; }

    internal DeviceBuffer<T> V { get; } = null!;

    internal DeviceBuffer<int> Table { get; } = null!;

    internal DeviceBuffer<float> Min { get; } = null!;

    internal DeviceBuffer<float> Max { get; } = null!;

    internal DeviceBuffer<float> Mean { get; } = null!;

    internal static Dictionary<string, string> Defines => new() { ["SRC_T"] = typeof(T) == typeof(Half) ? "1" : "2" };

    /// <inheritdoc/>
    public void Dispose()
    {
        K?.Dispose();
        V?.Dispose();
        Table?.Dispose();
        Min?.Dispose();
        Max?.Dispose();
        Mean?.Dispose();
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct SummaryParams
    {
        public ulong K, Min, Max;
        public long PageStride, RowStride, HeadStride;
        public int Pages, KvHeads, D, Page, LastPage, LastLength, FirstPage;
        public ulong Mean;
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
        float sc = Check(q, cache, output, scale, lse);
        if (questTokenBudget is < 1) throw new ArgumentOutOfRangeException(nameof(questTokenBudget), questTokenBudget, "the token budget must be ≥ 1");
        int pages = cache.Pages;
        int keep = questTokenBudget is { } budget ? Math.Clamp(budget / DevicePagedCache<T>.PageSize, 1, pages) : pages;
        Run(q, cache, output, sc, lse, keep, keep < pages ? PageSource.Quest : PageSource.All, null, null);
    }

    /// <summary>
    /// Landmark retrieval on the device (Mohtashami &amp; Jaggi, arXiv:2305.16300, as the CPU's LandmarkPolicy without
    /// trained landmark tokens): each kv head reads the pages whose mean key scores highest against the group's query
    /// heads (the largest q·mean over the group), within <paramref name="tokenBudget"/> tokens, and the last page.
    /// </summary>
    public static void ForwardLandmark<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, int tokenBudget, float? scale = null, DeviceTensor<float>? lse = null)
        where T : unmanaged
    {
        float sc = Check(q, cache, output, scale, lse);
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "the token budget must be ≥ 1");
        int pages = cache.Pages, keep = Math.Clamp(tokenBudget / DevicePagedCache<T>.PageSize, 1, pages);
        Run(q, cache, output, sc, lse, keep, keep < pages ? PageSource.Landmark : PageSource.All, null, null);
    }

    /// <summary>
    /// q [1, Hq, D] against only the listed logical pages of each kv head — the decode of a page-selection policy
    /// computed elsewhere (StreamingLLM's sink and recent pages, <see cref="DevicePagedCache{T}.SinkAndRecentPages"/>;
    /// H2O's or Landmark's pages from the host). <paramref name="pages"/> holds one list for every kv head, or one per
    /// kv head; each list ascending, distinct, within the cache's pages and not empty.
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, IReadOnlyList<IReadOnlyList<int>> pages, float? scale = null, DeviceTensor<float>? lse = null)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(pages);
        float sc = Check(q, cache, output, scale, lse);
        int hkv = cache.KvHeads, stride = cache.Pages;
        if (pages.Count != 1 && pages.Count != hkv) throw new ArgumentException($"pages must hold one list, or one per kv head ({hkv}); got {pages.Count}", nameof(pages));
        // Laid out [Hkv, longest list] (the kernel's list stride), so a step uploads only what it lists.
        int longest = 0;
        for (int h = 0; h < pages.Count; h++) longest = Math.Max(longest, pages[h]?.Count ?? 0);
        var list = new int[hkv * Math.Max(longest, 1)];
        var counts = new int[hkv];
        for (int h = 0; h < hkv; h++)
        {
            IReadOnlyList<int> mine = pages[pages.Count == 1 ? 0 : h] ?? throw new ArgumentException($"pages[{h}] is null", nameof(pages));
            if (mine.Count == 0) throw new ArgumentException($"the page list of kv head {h} is empty", nameof(pages));
            for (int i = 0; i < mine.Count; i++)
            {
                int page = mine[i];
                if (page < 0 || page >= stride || (i > 0 && page <= mine[i - 1]))
                {
                    throw new ArgumentException($"the page list of kv head {h} must be ascending, distinct pages in 0..{stride - 1}; entry {i} is {page}", nameof(pages));
                }
                list[(h * longest) + i] = page;
            }
            counts[h] = mine.Count;
        }
        Run(q, cache, output, sc, lse, longest, PageSource.Host, list, counts);
    }

    /// <summary>Checks q, the output, lse and the scale against the cache; returns the scale.</summary>
    private static float Check<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, float? scale, DeviceTensor<float>? lse) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentNullException.ThrowIfNull(output);
        int hkv = cache.KvHeads, d = cache.HeadDim;
        if (cache.Length == 0) throw new InvalidOperationException("the cache is empty: append tokens before decoding");
        if (q.Rank != 3 || q.Shape[0] != 1 || q.Shape[2] != d || q.Shape[1] % hkv != 0)
        {
            throw new ArgumentException($"q must be [1, Hq (a multiple of Hkv={hkv}), D={d}]; got {q.ShapeString()}", nameof(q));
        }
        int hq = q.Shape[1];
        if (!output.Shape.SequenceEqual(q.Shape)) throw new ArgumentException($"output must be {q.ShapeString()}; got {output.ShapeString()}", nameof(output));
        if (lse is not null && (lse.Rank != 2 || lse.Shape[0] != 1 || lse.Shape[1] != hq)) throw new ArgumentException($"lse must be [1, {hq}]", nameof(lse));
        if (hq / hkv > 16) throw new NotSupportedException($"GPU decoding packs a GQA group into 16 rows; Hq/Hkv = {hq / hkv}");
        if (q.Strides[2] != 1 || q.Strides[1] % 8 != 0 || output.Strides[2] != 1 || output.Strides[1] % 8 != 0)
        {
            throw new NotSupportedException("GPU decoding needs D contiguous and 16-byte aligned rows");
        }
        float sc = scale ?? 1f / MathF.Sqrt(d);
        if (!(sc > 0) || !float.IsFinite(sc)) throw new ArgumentException($"scale must be finite and > 0; got {sc}", nameof(scale));
        return sc;
    }

    /// <summary>Where a step's page lists come from: every page, Quest or Landmark scores on the device, or the host.</summary>
    private enum PageSource { All, Quest, Landmark, Host }

    /// <summary>The step: the page lists (at most <paramref name="keep"/> pages a kv head), split-K decode, merge.</summary>
    private static void Run<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, float sc, DeviceTensor<float>? lse, int keep,
        PageSource source, int[]? hostList, int[]? hostCounts) where T : unmanaged
    {
        int hkv = cache.KvHeads, d = cache.HeadDim, hq = q.Shape[1];
        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        FlashConfig config = FlashConfig.For(d);
        int pages = cache.Pages;
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
            switch (source)
            {
                case PageSource.Quest:
                case PageSource.Landmark:
                    _hostListed = null;
                    var qp = new QuestParams
                    {
                        Q = q.Buffer.Pointer, Min = cache.Min.Pointer, Max = cache.Max.Pointer, Table = cache.Table.Pointer,
                        Bounds = _bounds!.Pointer, QHead = q.Strides[1], Pages = pages, KvHeads = hkv, Group = hq / hkv, D = d,
                        Mean = cache.Mean.Pointer, Landmark = source == PageSource.Landmark ? 1 : 0,
                    };
                    void* qarg = &qp;
                    device.Kernel("select.cu", "quest_bounds", DevicePagedCache<T>.Defines).Launch((uint)((pages * hkv + 7) / 8), 1, 1, 256, 0, &qarg);
                    CudaSelectors.TopK(_bounds.Pointer, pages, keep, _list!.Pointer, pages, _count!.Pointer, hkv, DevicePagedCache<T>.Defines);
                    _allPages = null;   // the list now holds a selection
                    break;
                case PageSource.Host:
                    // A policy often lists the same pages step after step (StreamingLLM until its window moves a
                    // page): upload only a changed list — each copy from pageable memory waits for the device.
                    if (_hostListed is not { } last || !ReferenceEquals(last.Buffer, _list) || !last.List.AsSpan().SequenceEqual(hostList) || !last.Counts.AsSpan().SequenceEqual(hostCounts))
                    {
                        _list!.CopyFrom(hostList);
                        _count!.CopyFrom(hostCounts);
                        _hostListed = (_list, hostList!, hostCounts!);
                    }
                    _allPages = null;
                    break;
                default:
                    _hostListed = null;
                    AllPages(hkv, pages);
                    break;
            }
            var p = new CudaDecode.DecodeParams
            {
                Q = q.Buffer.Pointer, K = cache.K.Pointer, V = cache.V.Pointer, O = output.Buffer.Pointer, Lse = lse?.Buffer.Pointer ?? 0,
                PartO = _partO!.Pointer, PartLse = _partLse!.Pointer,
                QHead = q.Strides[1], KRow = (long)hkv * d, KHead = d, VRow = (long)hkv * d, VHead = d, OHead = output.Strides[1], LseHead = lse?.Strides[1] ?? 0,
                SeqlenK = cache.Length, Heads = hq, Group = hq / hkv, HeadDim = d, SplitLen = 0, Splits = splits, ScaleLog2 = sc * 1.4426950408889634f,
                PageTable = cache.Table.Pointer, PageList = _list!.Pointer, PageCount = _count!.Pointer, PageStride = cache.PageStride,
                TableStride = pages, ListStride = source == PageSource.Host ? Math.Max(keep, 1) : pages, PagesPerSplit = perSplit,
            };
            void* arg = &p;
            device.Kernel("flash_fwd.cu", "flash_decode", defines).Launch((uint)splits, (uint)hkv, 1, (uint)(config.Warps * 32), shared, &arg);
            device.Kernel("flash_fwd.cu", "decode_merge", defines).Launch((uint)hq, 1, 1, (uint)Math.Min(256, (d + 31) / 32 * 32), 0, &arg);
        }
    }

    /// <summary>The host lists the list buffer holds (buffer, list, counts), or null.</summary>
    private static (DeviceBuffer<int> Buffer, int[] List, int[] Counts)? _hostListed;

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
        public ulong Mean;
        public int Landmark;
    }
}
