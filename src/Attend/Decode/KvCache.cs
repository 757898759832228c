using Attend.Tensors;

namespace Attend.Decode;

/// <summary>
/// A paged key/value cache for decoding: per sequence and layer a list of pages of <see cref="PageSize"/> tokens,
/// keys [Hkv, D, page] (by channel) and values [Hkv, page, Dv] per page in the storage dtype (f32, f16 or bf16), plus per page and
/// kv head the channel-wise min, max (Quest's bounds) and mean (landmarks/centroids) of its keys, kept up to date on
/// append. Memory is accounted and capped: an append that would pass the cap throws before anything changes.
/// </summary>
public sealed class KvCache
{
    private readonly List<PageList[]> _sequences = [];   // [sequence][layer] → pages

    /// <summary>An empty cache.</summary>
    public KvCache(int layers, int kvHeads, int headDim, int valueDim = 0, DType storage = DType.Float16, int pageSize = 64, long memoryCapBytes = long.MaxValue,
        KvOffload? offload = null)
    {
        if (layers < 1 || kvHeads < 1 || headDim < 1 || valueDim < 0)
            throw new ArgumentException($"layers, kv heads and head dim must be ≥ 1; got {layers}, {kvHeads}, {headDim}");
        if (pageSize < 1) throw new ArgumentOutOfRangeException(nameof(pageSize), pageSize, "page size must be ≥ 1");
        if (storage == DType.Float64) throw new ArgumentException("storage must be f32, f16 or bf16", nameof(storage));
        if (memoryCapBytes < 1) throw new ArgumentOutOfRangeException(nameof(memoryCapBytes), memoryCapBytes, "memory cap must be ≥ 1 byte");
        Layers = layers;
        KvHeads = kvHeads;
        HeadDim = headDim;
        ValueDim = valueDim == 0 ? headDim : valueDim;
        Storage = storage;
        PageSize = pageSize;
        MemoryCapBytes = memoryCapBytes;
        if (offload is not null)
        {
            if (offload.ResidentBytes < 2 * PageBytes) throw new ArgumentOutOfRangeException(nameof(offload), offload.ResidentBytes, $"the resident budget must hold at least two pages ({2 * PageBytes} bytes)");
            _tier = new FileTier(this, offload);
        }
    }

    private readonly FileTier? _tier;

    /// <summary>The file tier's counters (all zero without one).</summary>
    public OffloadCounters OffloadStats => _tier?.Counters ?? default;

    /// <summary>Whether pages beyond the resident budget go to a file (an <see cref="KvOffload"/> was given).</summary>
    public bool HasFileTier => _tier is not null;

    /// <summary>
    /// Starts loading the given pages of (sequence, layer) from the file tier in the background, in the order given,
    /// and returns at once: a caller that knows what a later step will read (the next layer's likely pages while this
    /// layer computes) hides the file reads behind its work. Pages in memory or already loaded are skipped; without a
    /// file tier nothing happens.
    /// </summary>
    public void Prefetch(int sequence, int layer, IEnumerable<int> pages)
    {
        ArgumentNullException.ThrowIfNull(pages);
        PageList list = Pages(sequence, layer);
        int[] indices = [.. pages];
        foreach (int p in indices)
            if ((uint)p >= (uint)list.Count) throw new ArgumentOutOfRangeException(nameof(pages), p, $"page indices must be in 0..{list.Count - 1} for sequence {sequence}, layer {layer}");
        _tier?.Prefetch(indices.Select(p => list[p]));
    }

    /// <summary>
    /// Marks a decode step reading the cache until disposed: the file tier reuses the arrays of pages its page cache
    /// drops only when no step is reading. (Page data read outside a step — a policy called directly — must not run
    /// concurrently with a step on another thread.)
    /// </summary>
    internal ReadScope BeginRead()
    {
        _tier?.BeginRead();
        return new ReadScope(_tier);
    }

    internal readonly struct ReadScope(FileTier? tier) : IDisposable
    {
        public void Dispose() => tier?.EndRead();
    }

    /// <summary>Queues the pages for the file tier's background threads (no checks: the decode step's own lists).</summary>
    internal void PrefetchPages(IEnumerable<Page> pages) => _tier?.Prefetch(pages);

    /// <summary>Bytes of key/value data resident in memory (pages not in the file tier, summaries included).</summary>
    public long ResidentBytes { get; internal set; }

    /// <summary>Layers.</summary>
    public int Layers { get; }

    /// <summary>Key/value heads.</summary>
    public int KvHeads { get; }

    /// <summary>Key dim D.</summary>
    public int HeadDim { get; }

    /// <summary>Value dim Dv.</summary>
    public int ValueDim { get; }

    /// <summary>Element type of stored keys and values.</summary>
    public DType Storage { get; }

    /// <summary>Tokens per page.</summary>
    public int PageSize { get; }

    /// <summary>The memory cap in bytes.</summary>
    public long MemoryCapBytes { get; }

    /// <summary>Bytes held by pages (keys, values and summaries), in memory or in the file tier.</summary>
    public long MemoryBytes { get; private set; }

    internal long PageBytes => DataBytes + 3L * KvHeads * HeadDim * sizeof(float);

    /// <summary>Key and value bytes of one page (what the file tier stores).</summary>
    internal long DataBytes => (long)KvHeads * PageSize * (HeadDim + ValueDim) * DTypes.SizeOf(Storage);

    /// <summary>Adds an empty sequence; returns its id.</summary>
    public int AddSequence()
    {
        var layers = new PageList[Layers];
        for (int l = 0; l < Layers; l++) layers[l] = new PageList(this);
        _sequences.Add(layers);
        return _sequences.Count - 1;
    }

    /// <summary>Tokens stored for (sequence, layer).</summary>
    public int Length(int sequence, int layer = 0) => Pages(sequence, layer).Sum(p => p.Count);

    internal PageList Pages(int sequence, int layer)
    {
        if ((uint)sequence >= (uint)_sequences.Count) throw new ArgumentOutOfRangeException(nameof(sequence), sequence, $"no sequence {sequence}; the cache has {_sequences.Count}");
        if ((uint)layer >= (uint)Layers) throw new ArgumentOutOfRangeException(nameof(layer), layer, $"layer must be in 0..{Layers - 1}");
        return _sequences[sequence][layer];
    }

    /// <summary>Appends tokens: keys [n, Hkv, D] and values [n, Hkv, Dv]. Nothing changes if it throws.</summary>
    public void Append(int sequence, int layer, TensorView<float> keys, TensorView<float> values)
    {
        PageList pages = Pages(sequence, layer);
        if (keys.Rank != 3 || keys.Dim(1) != KvHeads || keys.Dim(2) != HeadDim)
            throw new ArgumentException($"keys must have shape [n, Hkv={KvHeads}, D={HeadDim}]; got {keys.ShapeString()}", nameof(keys));
        int n = keys.Dim(0);
        if (values.Rank != 3 || values.Dim(0) != n || values.Dim(1) != KvHeads || values.Dim(2) != ValueDim)
            throw new ArgumentException($"values must have shape [n={n}, Hkv={KvHeads}, Dv={ValueDim}]; got {values.ShapeString()}", nameof(values));
        int free = pages.Count == 0 ? 0 : PageSize - pages[^1].Count;
        long newPages = Math.Max(0, ((long)n - free + PageSize - 1) / PageSize);
        if (MemoryBytes + newPages * PageBytes > MemoryCapBytes)
        {
            throw new InvalidOperationException($"appending {n} tokens needs {newPages} new pages ({newPages * PageBytes} bytes); the cache holds {MemoryBytes} of its {MemoryCapBytes}-byte cap");
        }
        var k = new float[HeadDim];
        var v = new float[ValueDim];
        for (int t = 0; t < n; t++)
        {
            if (pages.Count == 0 || pages[^1].Count == PageSize)
            {
                if (_tier is not null && pages.Count > 0) _tier.Full(pages[^1]);
                pages.Add(new Page(this, pages.Summaries, pages.Count));
                MemoryBytes += PageBytes;
                ResidentBytes += PageBytes;
                _tier?.Balance();
            }
            Page page = pages[^1];
            for (int h = 0; h < KvHeads; h++)
            {
                for (int c = 0; c < HeadDim; c++) k[c] = keys[t, h, c];
                for (int c = 0; c < ValueDim; c++) v[c] = values[t, h, c];
                page.Write(h, page.Count, k, v);
            }
            page.Count++;
        }
    }

    /// <summary>Keeps the first <paramref name="length"/> tokens of every layer of the sequence (for beams and speculation).</summary>
    public void Truncate(int sequence, int length)
    {
        for (int l = 0; l < Layers; l++)
        {
            List<Page> pages = Pages(sequence, l);
            int total = pages.Sum(p => p.Count);
            if (length < 0 || length > total) throw new ArgumentOutOfRangeException(nameof(length), length, $"length must be in 0..{total}");
            int keepPages = (length + PageSize - 1) / PageSize;
            MemoryBytes -= (pages.Count - keepPages) * PageBytes;
            foreach (Page dropped in pages.Skip(keepPages)) ResidentBytes -= dropped.IsResident ? PageBytes : PageBytes - DataBytes;
            pages.RemoveRange(keepPages, pages.Count - keepPages);
            if (pages.Count > 0)
            {
                Page last = pages[^1];
                if (!last.IsResident)
                {
                    last.MakeResident();               // it will be written again
                    ResidentBytes += DataBytes;
                }
                last.Count = length - (keepPages - 1) * PageSize;
                last.Resummarize();
            }
        }
    }

    /// <summary>Copies a sequence into a new one (copy of its pages); returns the new id.</summary>
    public int Fork(int sequence)
    {
        long bytes = Enumerable.Range(0, Layers).Sum(l => (long)Pages(sequence, l).Count) * PageBytes;
        if (MemoryBytes + bytes > MemoryCapBytes) throw new InvalidOperationException($"forking needs {bytes} bytes; the cache holds {MemoryBytes} of its {MemoryCapBytes}-byte cap");
        int id = AddSequence();
        for (int l = 0; l < Layers; l++)
        {
            foreach (Page p in _sequences[sequence][l])
            {
                PageList into = _sequences[id][l];
                Page copy = p.Clone(into.Summaries, into.Count);
                into.Add(copy);
                ResidentBytes += PageBytes;
                if (copy.Count == PageSize) _tier?.Full(copy);
                _tier?.Balance();
            }
        }
        MemoryBytes += bytes;
        return id;
    }

    /// <summary>The pages of one (sequence, layer), with their key summaries side by side.</summary>
    internal sealed class PageList(KvCache cache) : List<Page>
    {
        public readonly PageSummaries Summaries = new(cache.KvHeads, cache.HeadDim);
    }

    /// <summary>
    /// Per kv head, the channel-wise min, max and mean key of every page of a (sequence, layer), one page after another
    /// ([page, D] per head): a policy scoring every page for one head streams one contiguous array instead of
    /// 2 × 2048 scattered 512-byte pieces per head at 131072 tokens (kept inside each page before). Its own effect was
    /// not isolated: the selection timings of that day were dominated by not-yet-optimized JIT code (docs/perf/decode.md).
    /// </summary>
    internal sealed class PageSummaries(int kvHeads, int d)
    {
        private float[][] _min = NewArrays(kvHeads, 0), _max = NewArrays(kvHeads, 0), _mean = NewArrays(kvHeads, 0);
        private int _capacity;

        /// <summary>Makes room for page <paramref name="index"/> (doubling).</summary>
        public void Reserve(int index)
        {
            if (index < _capacity) return;
            int capacity = Math.Max(16, Math.Max(index + 1, _capacity * 2));
            _min = Grow(_min, capacity);
            _max = Grow(_max, capacity);
            _mean = Grow(_mean, capacity);
            _capacity = capacity;
        }

        /// <summary>Head <paramref name="head"/>'s minima of every page, [page, D].</summary>
        public float[] Min(int head) => _min[head];

        /// <summary>Head <paramref name="head"/>'s maxima of every page, [page, D].</summary>
        public float[] Max(int head) => _max[head];

        /// <summary>Head <paramref name="head"/>'s mean keys of every page, [page, D].</summary>
        public float[] Mean(int head) => _mean[head];

        private float[][] Grow(float[][] arrays, int capacity)
        {
            var grown = NewArrays(arrays.Length, capacity * d);
            for (int h = 0; h < arrays.Length; h++) arrays[h].CopyTo(grown[h], 0);
            return grown;
        }

        private static float[][] NewArrays(int count, int length)
        {
            var arrays = new float[count][];
            for (int i = 0; i < count; i++) arrays[i] = new float[length];
            return arrays;
        }
    }

    /// <summary>A page's keys and values in the storage dtype (f32 arrays, or f16/bf16 bits).</summary>
    internal sealed class PageData
    {
        public float[]? KF, VF;
        public ushort[]? KH, VH;

        public PageData(KvCache cache)
        {
            int kn = cache.KvHeads * cache.PageSize * cache.HeadDim, vn = cache.KvHeads * cache.PageSize * cache.ValueDim;
            if (cache.Storage == DType.Float32)
            {
                KF = new float[kn];
                VF = new float[vn];
            }
            else
            {
                KH = new ushort[kn];
                VH = new ushort[vn];
            }
        }

        public PageData Clone() => new() { KF = (float[]?)KF?.Clone(), VF = (float[]?)VF?.Clone(), KH = (ushort[]?)KH?.Clone(), VH = (ushort[]?)VH?.Clone() };

        private PageData()
        {
        }
    }

    /// <summary>
    /// One page: keys [Hkv, D, page] (by channel: decode scores 16 keys per vector with no horizontal sums, see
    /// PageKernels), values [Hkv, page, Dv] in the storage dtype; per-head key min/max/mean. With a file
    /// tier a full page's data may live in the file (its summaries stay in memory: policies score pages without loading
    /// them); reading it loads it through the tier's cache of recently read pages.
    /// </summary>
    internal sealed class Page
    {
        private readonly KvCache _cache;
        private PageData? _data;
        private readonly PageSummaries _summaries;
        private readonly int _index;             // this page's row in the summaries
        public int Count;
        public long FileOffset = -1;           // where the file tier holds the data (when not resident)
        public ulong Checksum;                 // of the data written to the file

        /// <summary>Whether an f16 slot ever held Inf or NaN: such pages are widened exactly (see PageKernels).</summary>
        public bool HasNonFinite;

        public Page(KvCache cache, PageSummaries summaries, int index)
        {
            _cache = cache;
            _data = new PageData(cache);
            _summaries = summaries;
            _index = index;
            summaries.Reserve(index);
        }

        private Page(Page other, PageSummaries summaries, int index) : this(other._cache, summaries, index)
        {
            _data = other.Data.Clone();
            for (int h = 0; h < _cache.KvHeads; h++)
            {
                other.MinOf(h).CopyTo(MinOf(h));
                other.MaxOf(h).CopyTo(MaxOf(h));
                other.MeanOf(h).CopyTo(MeanOf(h));
            }
            Count = other.Count;
            HasNonFinite = other.HasNonFinite;
        }

        /// <summary>A copy of the page as page <paramref name="index"/> of another list.</summary>
        public Page Clone(PageSummaries summaries, int index) => new(this, summaries, index);

        /// <summary>Channel-wise minimum key of a head, [D].</summary>
        public Span<float> MinOf(int head) => _summaries.Min(head).AsSpan(_index * _cache.HeadDim, _cache.HeadDim);

        /// <summary>Channel-wise maximum key of a head, [D].</summary>
        public Span<float> MaxOf(int head) => _summaries.Max(head).AsSpan(_index * _cache.HeadDim, _cache.HeadDim);

        /// <summary>Mean key of a head, [D].</summary>
        public Span<float> MeanOf(int head) => _summaries.Mean(head).AsSpan(_index * _cache.HeadDim, _cache.HeadDim);

        /// <summary>Whether the data is in memory (not only in the file tier).</summary>
        public bool IsResident => _data is not null;

        /// <summary>The data: resident, or loaded from the file tier.</summary>
        public PageData Data => _data ?? _cache._tier!.Load(this);

        /// <summary>Brings an offloaded page back into memory for good (before it is written again).</summary>
        public void MakeResident()
        {
            _data = Data.Clone();
            FileOffset = -1;
            _cache._tier!.Forget(this);
        }

        /// <summary>Drops the resident data (the file tier holds it now) and returns it for writing.</summary>
        public PageData Release()
        {
            PageData data = _data!;
            _data = null;
            return data;
        }

        private float[]? KF => Data.KF;
        private float[]? VF => Data.VF;
        private ushort[]? KH => Data.KH;
        private ushort[]? VH => Data.VH;

        private ushort ToBits(float x) => _cache.Storage == DType.Float16 ? BitConverter.HalfToUInt16Bits((Half)x) : ((BFloat16)x).Bits;

        private float FromBits(ushort b) => _cache.Storage == DType.Float16 ? (float)BitConverter.UInt16BitsToHalf(b) : (float)BFloat16.FromBits(b);

        public void Write(int head, int slot, float[] k, float[] v)
        {
            int d = _cache.HeadDim, dv = _cache.ValueDim, ps = _cache.PageSize;
            long kb = (long)head * d * ps + slot, vb = ((long)head * ps + slot) * dv;
            PageData data = Data;
            float[] min = _summaries.Min(head), max = _summaries.Max(head), mean = _summaries.Mean(head);
            int s0 = _index * d;
            for (int c = 0; c < d; c++)
            {
                float stored;
                long at = kb + (long)c * ps;
                if (data.KF is not null) data.KF[at] = stored = k[c];
                else
                {
                    data.KH![at] = ToBits(k[c]);
                    stored = FromBits(data.KH[at]);
                    HasNonFinite |= NonFinite(data.KH[at]);
                }
                Summarize(min, max, mean, s0 + c, slot, stored);
            }
            for (int c = 0; c < dv; c++)
            {
                if (data.VF is not null) data.VF[vb + c] = v[c];
                else
                {
                    data.VH![vb + c] = ToBits(v[c]);
                    HasNonFinite |= NonFinite(data.VH[vb + c]);
                }
            }
        }

        /// <summary>An f16 Inf or NaN (the wide kernels' fast widening is exact only for finite halves; bf16 needs no care).</summary>
        private bool NonFinite(ushort bits) => _cache.Storage == DType.Float16 && (bits & 0x7C00) == 0x7C00;

        /// <summary>A head's keys as floats by channel, [D, PageSize] (slots past <see cref="Count"/> hold stale values).</summary>
        public void ReadKeysByChannel(int head, Span<float> k)
        {
            int n = _cache.HeadDim * _cache.PageSize;
            int b = head * n;
            if (KF is not null) KF.AsSpan(b, n).CopyTo(k);
            else Widen(KH.AsSpan(b, n), k);
        }

        /// <summary>Value rows [0, Count) of a head as floats, [Count, Dv] row-major.</summary>
        public void ReadValues(int head, Span<float> v)
        {
            int n = Count * _cache.ValueDim;
            int b = head * _cache.PageSize * _cache.ValueDim;
            if (VF is not null) VF.AsSpan(b, n).CopyTo(v);
            else Widen(VH.AsSpan(b, n), v);
        }

        /// <summary>Key (head, slot) as floats.</summary>
        public void ReadKey(int head, int slot, Span<float> k)
        {
            int d = _cache.HeadDim, ps = _cache.PageSize;
            long b = (long)head * d * ps + slot;
            PageData data = Data;
            for (int c = 0; c < d; c++)
                k[c] = data.KF is not null ? data.KF[b + (long)c * ps] : FromBits(data.KH![b + (long)c * ps]);
        }

        /// <summary>Value row (head, slot) as floats.</summary>
        public void ReadValue(int head, int slot, Span<float> v)
        {
            int dv = _cache.ValueDim;
            long b = ((long)head * _cache.PageSize + slot) * dv;
            if (VF is not null) VF.AsSpan((int)b, dv).CopyTo(v);
            else Widen(VH.AsSpan((int)b, dv), v);
        }

        private void Widen(ReadOnlySpan<ushort> bits, Span<float> destination) => ElementConvert.ToSingle(_cache.Storage, bits, destination);

        /// <summary>Recomputes min/max/mean over the first <see cref="Count"/> slots (after a truncation).</summary>
        public void Resummarize()
        {
            int d = _cache.HeadDim;
            var k = new float[d];
            for (int h = 0; h < _cache.KvHeads; h++)
                for (int slot = 0; slot < Count; slot++)
                {
                    ReadKey(h, slot, k);
                    for (int c = 0; c < d; c++) Summarize(_summaries.Min(h), _summaries.Max(h), _summaries.Mean(h), (_index * d) + c, slot, k[c]);
                }
        }

        /// <summary>Folds key value <paramref name="x"/> of slot <paramref name="slot"/> into element <paramref name="s"/> of a head's min, max and running mean.</summary>
        private static void Summarize(float[] min, float[] max, float[] mean, int s, int slot, float x)
        {
            min[s] = slot == 0 ? x : MathF.Min(min[s], x);
            max[s] = slot == 0 ? x : MathF.Max(max[s], x);
            mean[s] = slot == 0 ? x : mean[s] + (x - mean[s]) / (slot + 1);
        }
    }
}
