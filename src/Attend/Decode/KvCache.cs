using Attend.Tensors;

namespace Attend.Decode;

/// <summary>
/// A paged key/value cache for decoding: per sequence and layer a list of pages of <see cref="PageSize"/> tokens,
/// keys [Hkv, page, D] and values [Hkv, page, Dv] per page in the storage dtype (f32, f16 or bf16), plus per page and
/// kv head the channel-wise min, max (Quest's bounds) and mean (landmarks/centroids) of its keys, kept up to date on
/// append. Memory is accounted and capped: an append that would pass the cap throws before anything changes.
/// </summary>
public sealed class KvCache
{
    private readonly List<List<Page>[]> _sequences = [];   // [sequence][layer] → pages

    /// <summary>An empty cache.</summary>
    public KvCache(int layers, int kvHeads, int headDim, int valueDim = 0, DType storage = DType.Float16, int pageSize = 64, long memoryCapBytes = long.MaxValue)
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
    }

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

    /// <summary>Bytes held by pages (keys, values and summaries).</summary>
    public long MemoryBytes { get; private set; }

    internal long PageBytes => (long)KvHeads * PageSize * (HeadDim + ValueDim) * DTypes.SizeOf(Storage) + 3L * KvHeads * HeadDim * sizeof(float);

    /// <summary>Adds an empty sequence; returns its id.</summary>
    public int AddSequence()
    {
        var layers = new List<Page>[Layers];
        for (int l = 0; l < Layers; l++) layers[l] = [];
        _sequences.Add(layers);
        return _sequences.Count - 1;
    }

    /// <summary>Tokens stored for (sequence, layer).</summary>
    public int Length(int sequence, int layer = 0) => Pages(sequence, layer).Sum(p => p.Count);

    internal List<Page> Pages(int sequence, int layer)
    {
        if ((uint)sequence >= (uint)_sequences.Count) throw new ArgumentOutOfRangeException(nameof(sequence), sequence, $"no sequence {sequence}; the cache has {_sequences.Count}");
        if ((uint)layer >= (uint)Layers) throw new ArgumentOutOfRangeException(nameof(layer), layer, $"layer must be in 0..{Layers - 1}");
        return _sequences[sequence][layer];
    }

    /// <summary>Appends tokens: keys [n, Hkv, D] and values [n, Hkv, Dv]. Nothing changes if it throws.</summary>
    public void Append(int sequence, int layer, TensorView<float> keys, TensorView<float> values)
    {
        List<Page> pages = Pages(sequence, layer);
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
                pages.Add(new Page(this));
                MemoryBytes += PageBytes;
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
            pages.RemoveRange(keepPages, pages.Count - keepPages);
            if (pages.Count > 0)
            {
                pages[^1].Count = length - (keepPages - 1) * PageSize;
                pages[^1].Resummarize();
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
            _sequences[id][l].AddRange(_sequences[sequence][l].Select(p => p.Clone()));
        }
        MemoryBytes += bytes;
        return id;
    }

    /// <summary>One page: keys [Hkv, page, D], values [Hkv, page, Dv] in the storage dtype; per-head key min/max/mean.</summary>
    internal sealed class Page
    {
        private readonly KvCache _cache;
        public readonly float[]? KF, VF;
        public readonly ushort[]? KH, VH;       // f16 or bf16 bits
        public readonly float[] Min, Max, Mean; // [Hkv, D]
        public int Count;

        public Page(KvCache cache)
        {
            _cache = cache;
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
            Min = new float[cache.KvHeads * cache.HeadDim];
            Max = new float[cache.KvHeads * cache.HeadDim];
            Mean = new float[cache.KvHeads * cache.HeadDim];
        }

        private Page(Page other)
        {
            _cache = other._cache;
            KF = (float[]?)other.KF?.Clone();
            VF = (float[]?)other.VF?.Clone();
            KH = (ushort[]?)other.KH?.Clone();
            VH = (ushort[]?)other.VH?.Clone();
            Min = (float[])other.Min.Clone();
            Max = (float[])other.Max.Clone();
            Mean = (float[])other.Mean.Clone();
            Count = other.Count;
        }

        public Page Clone() => new(this);

        private ushort ToBits(float x) => _cache.Storage == DType.Float16 ? BitConverter.HalfToUInt16Bits((Half)x) : ((BFloat16)x).Bits;

        private float FromBits(ushort b) => _cache.Storage == DType.Float16 ? (float)BitConverter.UInt16BitsToHalf(b) : (float)BFloat16.FromBits(b);

        public void Write(int head, int slot, float[] k, float[] v)
        {
            int d = _cache.HeadDim, dv = _cache.ValueDim;
            long kb = ((long)head * _cache.PageSize + slot) * d, vb = ((long)head * _cache.PageSize + slot) * dv;
            for (int c = 0; c < d; c++)
            {
                float stored;
                if (KF is not null) KF[kb + c] = stored = k[c];
                else
                {
                    KH![kb + c] = ToBits(k[c]);
                    stored = FromBits(KH[kb + c]);
                }
                Summarize(head * d + c, slot, stored);
            }
            for (int c = 0; c < dv; c++)
            {
                if (VF is not null) VF[vb + c] = v[c];
                else VH![vb + c] = ToBits(v[c]);
            }
        }

        /// <summary>Key rows [0, Count) of a head as floats, [Count, D] row-major.</summary>
        public void ReadKeys(int head, Span<float> k)
        {
            int n = Count * _cache.HeadDim;
            int b = head * _cache.PageSize * _cache.HeadDim;
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

        /// <summary>Key row (head, slot) as floats.</summary>
        public void ReadKey(int head, int slot, Span<float> k)
        {
            int d = _cache.HeadDim;
            long b = ((long)head * _cache.PageSize + slot) * d;
            if (KF is not null) KF.AsSpan((int)b, d).CopyTo(k);
            else Widen(KH.AsSpan((int)b, d), k);
        }

        /// <summary>Value row (head, slot) as floats.</summary>
        public void ReadValue(int head, int slot, Span<float> v)
        {
            int dv = _cache.ValueDim;
            long b = ((long)head * _cache.PageSize + slot) * dv;
            if (VF is not null) VF.AsSpan((int)b, dv).CopyTo(v);
            else Widen(VH.AsSpan((int)b, dv), v);
        }

        private void Widen(ReadOnlySpan<ushort> bits, Span<float> destination)
        {
            if (_cache.Storage == DType.Float16) ElementConvert.ToSingle(System.Runtime.InteropServices.MemoryMarshal.Cast<ushort, Half>(bits), destination);
            else ElementConvert.ToSingle(System.Runtime.InteropServices.MemoryMarshal.Cast<ushort, BFloat16>(bits), destination);
        }

        /// <summary>Recomputes min/max/mean over the first <see cref="Count"/> slots (after a truncation).</summary>
        public void Resummarize()
        {
            int d = _cache.HeadDim;
            var k = new float[d];
            for (int h = 0; h < _cache.KvHeads; h++)
                for (int slot = 0; slot < Count; slot++)
                {
                    ReadKey(h, slot, k);
                    for (int c = 0; c < d; c++) Summarize(h * d + c, slot, k[c]);
                }
        }

        /// <summary>Folds key value <paramref name="x"/> of slot <paramref name="slot"/> into channel <paramref name="s"/>'s min, max and running mean.</summary>
        private void Summarize(int s, int slot, float x)
        {
            Min[s] = slot == 0 ? x : MathF.Min(Min[s], x);
            Max[s] = slot == 0 ? x : MathF.Max(Max[s], x);
            Mean[s] = slot == 0 ? x : Mean[s] + (x - Mean[s]) / (slot + 1);
        }
    }
}
