using System.Runtime.InteropServices;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// KV caches of sequences in device memory, paged as the CPU's <see cref="Decode.KvCache"/>: one pool of 64-token pages
/// [pages, 64, Hkv, D] (bf16 or f16) shared by up to MaxSequences sequences, each with a page table mapping its logical
/// pages to pool pages in any order, and per pool page the channel-wise key min/max Quest needs and the mean key Landmark
/// needs (computed on the device when the pages arrive). A cache starts with sequence 0;
/// <see cref="AddSequence"/> adds more, <see cref="RemoveSequence"/> returns a sequence's pages to the pool (as a serving
/// loop retires a request), and <see cref="Append(TensorView{T}, TensorView{T}, int)"/> adds tokens into a sequence's last
/// page and fresh pool pages. <see cref="CudaPagedDecode"/> decodes any batch of the sequences in one launch.
/// </summary>
public sealed unsafe class DevicePagedCache<T> : IDisposable where T : unmanaged
{
    /// <summary>Tokens per page (the decode kernel's key tile).</summary>
    public const int PageSize = 64;

    private readonly Sequence?[] _sequences;   // null: a free id
    private readonly Stack<int> _freePages = [];   // pool pages returned by removed or truncated sequences
    private readonly int[] _refs;                // per pool page: the sequences whose tables hold it (full pages are shared by forks)
    private int _poolUsed;                       // pool pages handed out from the end (the rest are on _freePages or unused)
    private DeviceBuffer<T>? _stageRows;        // an append's new rows (keys, then values)
    private DeviceBuffer<long>? _stageMeta;      // their pool offsets and the append's bookkeeping

    /// <summary>A sequence's host-side state: its table (logical → pool page) and length.</summary>
    private sealed class Sequence(int capacityPages)
    {
        public readonly int[] Table = new int[capacityPages];
        public int Length;
        public int Truncations;   // lets per-sequence state on the device (H2O's) notice that tokens were taken back
        public int Pages => (Length + PageSize - 1) / PageSize;
    }

    private DevicePagedCache(int kvHeads, int headDim, int capacityPages, int maxSequences)
    {
        KvHeads = kvHeads;
        HeadDim = headDim;
        CapacityPages = capacityPages;
        long elements = capacityPages * PageStride;
        _sequences = new Sequence?[maxSequences];
        _sequences[0] = new Sequence(capacityPages);
        _refs = new int[capacityPages];
        K = DeviceBuffer<T>.Allocate(elements);
        try
        {
            V = DeviceBuffer<T>.Allocate(elements);
            Table = DeviceBuffer<int>.Allocate((long)maxSequences * capacityPages);
            Lengths = DeviceBuffer<int>.Allocate(maxSequences);
            Lengths.CopyFrom(new int[maxSequences]);
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

    /// <summary>
    /// An empty cache for <paramref name="kvHeads"/> heads of <paramref name="headDim"/> with room for
    /// <paramref name="capacityTokens"/> tokens in all (whole pages), holding sequence 0 and room for
    /// <paramref name="maxSequences"/> sequences at a time.
    /// </summary>
    public static DevicePagedCache<T> Create(int kvHeads, int headDim, int capacityTokens, int maxSequences = 1)
    {
        CheckType();
        if (kvHeads < 1) throw new ArgumentOutOfRangeException(nameof(kvHeads), kvHeads, "kvHeads must be ≥ 1");
        CheckHeadDim(headDim);
        if (capacityTokens < 1) throw new ArgumentOutOfRangeException(nameof(capacityTokens), capacityTokens, "capacityTokens must be ≥ 1");
        if (maxSequences < 1) throw new ArgumentOutOfRangeException(nameof(maxSequences), maxSequences, "maxSequences must be ≥ 1");
        return new DevicePagedCache<T>(kvHeads, headDim, (capacityTokens + PageSize - 1) / PageSize, maxSequences);
    }

    /// <summary>
    /// The cache of k, v [1, S, Hkv, D] (host) as sequence 0, its pages stored in the pool in <paramref name="poolOrder"/>
    /// (pool slot of each logical page, a permutation; default in order) — the layout a paged allocator leaves behind —
    /// with room for <paramref name="capacityTokens"/> tokens in all (default: just these).
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
        var cache = new DevicePagedCache<T>(hkv, d, Math.Max(pages, (capacityTokens + PageSize - 1) / PageSize), 1);
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
            poolOrder.CopyTo(cache._sequences[0]!.Table, 0);
            cache._poolUsed = pages;
            cache._refs.AsSpan(0, pages).Fill(1);
            cache.Commit(0, s, 0, 0);
            return cache;
        }
        catch
        {
            cache.Dispose();
            throw;
        }
    }

    /// <summary>Adds an empty sequence; returns its id (the lowest free one).</summary>
    public int AddSequence()
    {
        int id = Array.IndexOf(_sequences, null);
        if (id < 0) throw new InvalidOperationException($"the cache holds its maximum of {_sequences.Length} sequences; remove one first");
        _sequences[id] = new Sequence(CapacityPages);
        Lengths.CopyFrom([0], id);
        return id;
    }

    /// <summary>Removes <paramref name="sequence"/>: its pages return to the pool and its id may be handed out again.</summary>
    public void RemoveSequence(int sequence)
    {
        Sequence seq = Get(sequence);
        for (int page = 0; page < seq.Pages; page++) Release(seq.Table[page]);
        _sequences[sequence] = null;
        Lengths.CopyFrom([0], sequence);
    }

    /// <summary>
    /// Appends k, v [1, n, Hkv, D] (host) after <paramref name="sequence"/>'s tokens: into its last page while it has
    /// room, then into free pool pages. Everything is checked before anything is written, so a rejected append leaves
    /// the cache as it was.
    /// </summary>
    public void Append(TensorView<T> k, TensorView<T> v, int sequence = 0)
    {
        if (k.Rank != 4 || k.Dim(0) != 1 || k.Dim(2) != KvHeads || k.Dim(3) != HeadDim)
        {
            throw new ArgumentException($"k must be [1, n, {KvHeads}, {HeadDim}]; got {TensorView<T>.FormatShape<int>(k.Shape)}", nameof(k));
        }
        AppendRows(k, v, [sequence]);
    }

    /// <summary>
    /// Appends k, v [B, n, Hkv, D] (host): row b's n tokens after those of sequence <paramref name="sequences"/>[b] — a
    /// generation step of a batch in the copies and launches of one append, where appending sequence by sequence pays
    /// them per sequence. The sequences are distinct; everything is checked before anything is written.
    /// </summary>
    public void Append(TensorView<T> k, TensorView<T> v, IReadOnlyList<int> sequences)
    {
        ArgumentNullException.ThrowIfNull(sequences);
        if (k.Rank != 4 || k.Dim(0) != sequences.Count || k.Dim(2) != KvHeads || k.Dim(3) != HeadDim)
        {
            throw new ArgumentException($"k must be [B={sequences.Count} (one row per sequence), n, {KvHeads}, {HeadDim}]; got {TensorView<T>.FormatShape<int>(k.Shape)}", nameof(k));
        }
        AppendRows(k, v, sequences);
    }

    /// <summary>
    /// Both appends: the new rows (keys then values) go up in one copy, their pool offsets and the bookkeeping — the
    /// touched pages (pool page, keys) and the new table entries and lengths — in another; <c>pool_append</c> scatters
    /// the rows and <c>page_summaries</c> (list mode) recomputes the touched pages' summaries and writes the entries.
    /// </summary>
    private void AppendRows(TensorView<T> k, TensorView<T> v, IReadOnlyList<int> sequences)
    {
        if (!v.Shape.SequenceEqual(k.Shape)) throw new ArgumentException($"v must have k's shape {TensorView<T>.FormatShape<int>(k.Shape)}; got {TensorView<T>.FormatShape<int>(v.Shape)}", nameof(v));
        int b = sequences.Count, n = k.Dim(1);
        if (n < 1 || b < 1) throw new ArgumentException("k has no tokens", nameof(k));
        var seqs = new Sequence[b];
        long needed = 0;
        for (int i = 0; i < b; i++)
        {
            seqs[i] = Get(sequences[i]);
            for (int j = 0; j < i; j++)
                if (sequences[j] == sequences[i]) throw new ArgumentException($"sequence {sequences[i]} is listed twice", nameof(sequences));
            needed += ((seqs[i].Length + (long)n + PageSize - 1) / PageSize) - seqs[i].Pages;
        }
        if (needed > FreePages)
        {
            throw new InvalidOperationException(
                $"appending {n} tokens to each of {b} sequence(s) needs {needed} more pages; {FreePages} of the pool's {CapacityPages} are free (a capacity of {CapacityPages * PageSize} tokens)");
        }
        long rowElements = (long)KvHeads * HeadDim, rows = (long)b * n;
        var staged = new T[2 * rows * rowElements];                 // keys, then values
        var offsets = new long[rows];
        var ints = new List<int>();                                 // (pool page, keys) pairs, then (index, value) pairs
        var entries = new List<int>();                              // (table index or −1 − sequence, value)
        for (int i = 0; i < b; i++)
        {
            Sequence seq = seqs[i];
            int oldLength = seq.Length, oldPages = seq.Pages, newLength = oldLength + n, newPages = (newLength + PageSize - 1) / PageSize;
            for (int page = oldPages; page < newPages; page++)
            {
                seq.Table[page] = Allocate();
                entries.Add((sequences[i] * CapacityPages) + page);
                entries.Add(seq.Table[page]);
            }
            for (int j = 0; j < n; j++)
            {
                int position = oldLength + j;
                long row = ((long)i * n) + j;
                offsets[row] = (seq.Table[position / PageSize] * PageStride) + (position % PageSize * rowElements);
                for (int h = 0; h < KvHeads; h++)
                {
                    long at = (row * rowElements) + ((long)h * HeadDim);
                    CopyRow(k, i, j, h, staged.AsSpan((int)at, HeadDim));
                    CopyRow(v, i, j, h, staged.AsSpan((int)((rows * rowElements) + at), HeadDim));
                }
            }
            for (int page = oldLength % PageSize != 0 ? oldPages - 1 : oldPages; page < newPages; page++)
            {
                ints.Add(seq.Table[page]);
                ints.Add(Math.Min(PageSize, newLength - (page * PageSize)));
            }
            entries.Add(-1 - sequences[i]);
            entries.Add(newLength);
            seq.Length = newLength;
        }
        int touched = ints.Count / 2;
        ints.AddRange(entries);
        if (ints.Count % 2 != 0) ints.Add(0);
        var meta = new long[offsets.Length + (ints.Count / 2)];     // the offsets, then the ints two to a long
        offsets.CopyTo(meta, 0);
        MemoryMarshal.Cast<int, long>(ints.ToArray().AsSpan()).CopyTo(meta.AsSpan(offsets.Length));
        DeviceBuffer<T>.EnsureLength(ref _stageRows, staged.Length);
        DeviceBuffer<long>.EnsureLength(ref _stageMeta, meta.Length);
        _stageRows!.CopyFrom(staged);
        _stageMeta!.CopyFrom(meta);
        ulong sk = _stageRows.Pointer, sv = sk + ((ulong)(rows * rowElements) * (ulong)sizeof(T)), so = _stageMeta.Pointer, pk = K.Pointer, pv = V.Pointer;
        ulong list = so + ((ulong)offsets.Length * sizeof(long));
        int elements = (int)rowElements;
        void** args = stackalloc void*[6];
        args[0] = &sk;
        args[1] = &sv;
        args[2] = &so;
        args[3] = &pk;
        args[4] = &pv;
        args[5] = &elements;
        CudaBackend.Device.Kernel("select.cu", "pool_append", Defines).Launch((uint)rows, 1, 1, 128, 0, args);
        var sp = new SummaryParams
        {
            K = K.Pointer, Min = Min.Pointer, Max = Max.Pointer, Mean = Mean.Pointer, PageStride = PageStride, RowStride = rowElements, HeadStride = HeadDim,
            KvHeads = KvHeads, D = HeadDim, Page = PageSize, LastPage = -1, Lengths = Lengths.Pointer,
            List = list, Entries = list + ((ulong)touched * 2 * sizeof(int)), Updates = entries.Count / 2, Table = Table.Pointer,
        };
        void* arg = &sp;
        CudaBackend.Device.Kernel("select.cu", "page_summaries", Defines).Launch((uint)touched, (uint)KvHeads, 1, 256, 0, &arg);
    }

    /// <summary>
    /// Keeps the first <paramref name="length"/> tokens of <paramref name="sequence"/> (a rejected draft of speculative
    /// decoding, a beam cut back): pages past them return to the pool; a partial last page shared with a fork is copied
    /// first, since the next append writes into it.
    /// </summary>
    public void Truncate(int sequence, int length)
    {
        Sequence seq = Get(sequence);
        if (length < 0 || length > seq.Length) throw new ArgumentOutOfRangeException(nameof(length), length, $"length must be in 0..{seq.Length} (sequence {sequence}'s tokens)");
        seq.Truncations += length < seq.Length ? 1 : 0;
        int keepPages = (length + PageSize - 1) / PageSize;
        bool copy = length % PageSize != 0 && _refs[seq.Table[keepPages - 1]] > 1;
        int freed = 0;
        for (int page = keepPages; page < seq.Pages; page++) freed += _refs[seq.Table[page]] == 1 ? 1 : 0;
        if (copy && FreePages + freed == 0) throw new InvalidOperationException($"truncating sequence {sequence} into a page it shares needs a free page to copy it into; none of the pool's {CapacityPages} is free");
        for (int page = keepPages; page < seq.Pages; page++) Release(seq.Table[page]);
        if (copy) seq.Table[keepPages - 1] = CopyPage(seq.Table[keepPages - 1]);
        if (length == 0)
        {
            seq.Length = 0;
            Lengths.CopyFrom([0], sequence);
            return;
        }
        Commit(sequence, length, keepPages - 1, copy ? keepPages - 1 : keepPages);
    }

    /// <summary>
    /// A new sequence holding <paramref name="sequence"/>'s tokens (beam search, parallel sampling from one prompt): its
    /// full pages are shared (they are never written again), a partial last page is copied. Returns the new id.
    /// </summary>
    public int Fork(int sequence)
    {
        Sequence source = Get(sequence);
        bool partial = source.Length % PageSize != 0;
        if (partial && FreePages == 0) throw new InvalidOperationException($"forking sequence {sequence} needs a free page for its partial last page; none of the pool's {CapacityPages} is free");
        int id = AddSequence();
        Sequence fork = _sequences[id]!;
        int pages = source.Pages;
        source.Table.AsSpan(0, pages).CopyTo(fork.Table);
        for (int page = 0; page < pages - (partial ? 1 : 0); page++) _refs[fork.Table[page]]++;
        if (partial) fork.Table[pages - 1] = CopyPage(source.Table[pages - 1], share: false);
        if (pages > 0) Commit(id, source.Length, partial ? pages - 1 : pages, 0);
        return id;
    }

    /// <summary>A pool page for new tokens (reference count 1).</summary>
    private int Allocate()
    {
        int page = _freePages.Count > 0 ? _freePages.Pop() : _poolUsed++;
        _refs[page] = 1;
        return page;
    }

    /// <summary>One table fewer holds <paramref name="page"/>: back to the pool when none does.</summary>
    private void Release(int page)
    {
        if (--_refs[page] == 0) _freePages.Push(page);
    }

    /// <summary>
    /// A fresh pool page holding <paramref name="page"/>'s keys and values (copied on the device), for a table that is
    /// about to write into it; unless <paramref name="share"/> is false, the caller's table lets go of the original.
    /// </summary>
    private int CopyPage(int page, bool share = true)
    {
        int fresh = Allocate();
        K.CopyWithin(page * PageStride, fresh * PageStride, PageStride);
        V.CopyWithin(page * PageStride, fresh * PageStride, PageStride);
        if (share) Release(page);
        return fresh;
    }

    /// <summary>
    /// Sets <paramref name="sequence"/>'s length (a cache built from the host, a truncation, a fork): uploads its table
    /// entries from <paramref name="firstNewEntry"/> on and recomputes the summaries of its logical pages from
    /// <paramref name="firstTouched"/> on, whose kernel also stores the length on the device.
    /// </summary>
    private void Commit(int sequence, int length, int firstTouched, int firstNewEntry)
    {
        Sequence seq = _sequences[sequence]!;
        int pages = (length + PageSize - 1) / PageSize;
        long row = (long)sequence * CapacityPages;
        Table.CopyFrom(seq.Table.AsSpan(firstNewEntry, pages - firstNewEntry), row + firstNewEntry);
        int lastPool = seq.Table[pages - 1], lastLength = length - ((pages - 1) * PageSize);
        var p = new SummaryParams
        {
            K = K.Pointer, Min = Min.Pointer, Max = Max.Pointer, Mean = Mean.Pointer, PageStride = PageStride, RowStride = (long)KvHeads * HeadDim, HeadStride = HeadDim,
            KvHeads = KvHeads, D = HeadDim, Page = PageSize, LastPage = lastPool, LastLength = lastLength,
            Lengths = Lengths.Pointer, Sequence = sequence, Length = length,   // the first launch stores the new length (no copy in the generation loop)
        };
        // The touched logical pages' pool pages, in runs of consecutive slots: one launch per run (all of them at
        // once for a cache built from the host; the old partial page and the fresh ones after an append).
        int[] slots = [.. seq.Table.AsSpan(firstTouched, pages - firstTouched).ToArray().Order()];
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
        if (slots.Length == 0) Lengths.CopyFrom([length], sequence);   // no page to summarize (a fork sharing only full pages)
        seq.Length = length;
    }

    /// <summary>
    /// StreamingLLM's pages (Xiao et al., arXiv:2309.17453, as the CPU's StreamingLLM policy): those of
    /// <paramref name="sequence"/> holding its first <paramref name="sinkTokens"/> tokens and its last
    /// <paramref name="recentTokens"/>, ascending — for
    /// <see cref="CudaPagedDecode.Forward{T}(DeviceTensor{T}, DevicePagedCache{T}, DeviceTensor{T}, IReadOnlyList{IReadOnlyList{int}}, float?, DeviceTensor{float}?, int)"/>.
    /// </summary>
    public IReadOnlyList<int> SinkAndRecentPages(int sinkTokens, int recentTokens, int sequence = 0)
    {
        if (sinkTokens < 0) throw new ArgumentOutOfRangeException(nameof(sinkTokens), sinkTokens, "sinkTokens must be ≥ 0");
        if (recentTokens < 0) throw new ArgumentOutOfRangeException(nameof(recentTokens), recentTokens, "recentTokens must be ≥ 0");
        if (sinkTokens + recentTokens == 0) throw new ArgumentException("sinkTokens + recentTokens must be ≥ 1");
        int length = Length(sequence), count = Pages(sequence);
        if (length == 0) throw new InvalidOperationException($"sequence {sequence} is empty");
        var pages = new SortedSet<int>();
        for (int page = 0; page < Math.Min(count, (sinkTokens + PageSize - 1) / PageSize); page++) pages.Add(page);
        for (int page = Math.Max(0, length - recentTokens) / PageSize; page < count && recentTokens > 0; page++) pages.Add(page);
        return [.. pages];
    }

    private Sequence Get(int sequence)
    {
        if ((uint)sequence >= (uint)_sequences.Length || _sequences[sequence] is null)
        {
            throw new ArgumentOutOfRangeException(nameof(sequence), sequence, $"no sequence {sequence} in the cache (ids in use: {string.Join(", ", Enumerable.Range(0, _sequences.Length).Where(i => _sequences[i] is not null))})");
        }
        return _sequences[sequence]!;
    }

    private static void CheckType()
    {
        if (typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16)) throw new NotSupportedException($"the paged GPU cache holds bf16 or f16; got {typeof(T).Name}");
    }

    private static void CheckHeadDim(int d)
    {
        if (d > 256 || d % 8 != 0 || d < 8) throw new NotSupportedException($"GPU decoding needs D ≤ 256 and a multiple of 8; got {d}");
    }

    /// <summary>Row (0, j, h) of x into <paramref name="destination"/>.</summary>
    private static void CopyRow(TensorView<T> x, int j, int h, Span<T> destination) => CopyRow(x, 0, j, h, destination);

    /// <summary>Row (b, j, h) of x into <paramref name="destination"/>: one span copy when the row is contiguous.</summary>
    private static void CopyRow(TensorView<T> x, int b, int j, int h, Span<T> destination)
    {
        if (x.Stride(3) == 1)
        {
            MemoryMarshal.CreateReadOnlySpan(ref x[b, j, h, 0], destination.Length).CopyTo(destination);
            return;
        }
        for (int c = 0; c < destination.Length; c++) destination[c] = x[b, j, h, c];
    }

    /// <summary>Tokens in <paramref name="sequence"/>.</summary>
    public int Length(int sequence = 0) => Get(sequence).Length;

    /// <summary>Logical pages of <paramref name="sequence"/> (the last may be partial).</summary>
    public int Pages(int sequence = 0) => Get(sequence).Pages;

    /// <summary>What identifies the tokens of <paramref name="sequence"/> so far: its state object and how often it was truncated.</summary>
    internal (object Sequence, int Truncations) History(int sequence)
    {
        Sequence seq = Get(sequence);
        return (seq, seq.Truncations);
    }

    /// <summary>Whether <paramref name="sequence"/> is a sequence of the cache now.</summary>
    public bool HasSequence(int sequence) => (uint)sequence < (uint)_sequences.Length && _sequences[sequence] is not null;

    /// <summary>The most sequences the cache holds at a time.</summary>
    public int MaxSequences => _sequences.Length;

    /// <summary>Pages the pool holds: the cache's capacity is CapacityPages · <see cref="PageSize"/> tokens over all its sequences.</summary>
    public int CapacityPages { get; }

    /// <summary>Pool pages not holding any sequence's tokens.</summary>
    public int FreePages => _freePages.Count + (CapacityPages - _poolUsed);

    /// <summary>Key/value heads.</summary>
    public int KvHeads { get; }

    /// <summary>Head dim.</summary>
    public int HeadDim { get; }

    internal long PageStride => (long)PageSize * KvHeads * HeadDim;

    internal DeviceBuffer<T> K { get; }

    internal DeviceBuffer<T> V { get; } = null!;

    /// <summary>[MaxSequences, CapacityPages]: each sequence's logical → pool page.</summary>
    internal DeviceBuffer<int> Table { get; } = null!;

    /// <summary>[MaxSequences]: each sequence's tokens (0 for a free id).</summary>
    internal DeviceBuffer<int> Lengths { get; } = null!;

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
        Lengths?.Dispose();
        _stageRows?.Dispose();
        _stageMeta?.Dispose();
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
        public ulong Lengths;
        public int Sequence, Length;
        public ulong List, Entries;
        public int Updates;
        public ulong Table;
    }
}

/// <summary>
/// Decoding over a <see cref="DevicePagedCache{T}"/>: split-K over pages with the exact LSE merge (the kernel of
/// <see cref="CudaDecode"/> reading each 64-key tile through the page table), GQA-aware, a batch of the cache's
/// sequences (of any lengths) in one launch; every page, or the pages Quest or Landmark select on the device (per
/// sequence and kv head: page scores, the last page's set to +∞ so it is always read, and the best ⌊budget / 64⌋ pages
/// by a radix select — ties at the edge taken lowest page first — listed ascending), or pages listed by the host.
/// </summary>
public static unsafe class CudaPagedDecode
{
    private static readonly Lock Gate = new();
    private static DeviceBuffer<float>? _partO, _partLse, _bounds;
    private static DeviceBuffer<int>? _list, _count, _batchSeq;

    /// <summary>
    /// q [B, Hq, D] (the new token of each decoded sequence) against the cache → output [B, Hq, D], optional lse [B, Hq]:
    /// batch row b decodes sequence <paramref name="sequences"/>[b] (default: sequence b). With
    /// <paramref name="questTokenBudget"/>, each sequence's kv heads read only the pages Quest picks within that many
    /// tokens; otherwise every page.
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, int? questTokenBudget = null, float? scale = null, DeviceTensor<float>? lse = null,
        IReadOnlyList<int>? sequences = null)
        where T : unmanaged
    {
        (float sc, int[] ids, int pages) = Check(q, cache, output, scale, lse, sequences);
        if (questTokenBudget is < 1) throw new ArgumentOutOfRangeException(nameof(questTokenBudget), questTokenBudget, "the token budget must be ≥ 1");
        int keep = questTokenBudget is { } budget ? Math.Clamp(budget / DevicePagedCache<T>.PageSize, 1, pages) : pages;
        Run(q, cache, output, sc, lse, ids, pages, keep, keep < pages ? PageSource.Quest : PageSource.All, null, null);
    }

    /// <summary>
    /// Landmark retrieval on the device (Mohtashami &amp; Jaggi, arXiv:2305.16300, as the CPU's LandmarkPolicy without
    /// trained landmark tokens): each kv head reads the pages whose mean key scores highest against the group's query
    /// heads (the largest q·mean over the group), within <paramref name="tokenBudget"/> tokens, and the last page; a
    /// batch as in <see cref="Forward{T}(DeviceTensor{T}, DevicePagedCache{T}, DeviceTensor{T}, int?, float?, DeviceTensor{float}?, IReadOnlyList{int}?)"/>.
    /// </summary>
    public static void ForwardLandmark<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, int tokenBudget, float? scale = null, DeviceTensor<float>? lse = null,
        IReadOnlyList<int>? sequences = null)
        where T : unmanaged
    {
        (float sc, int[] ids, int pages) = Check(q, cache, output, scale, lse, sequences);
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "the token budget must be ≥ 1");
        int keep = Math.Clamp(tokenBudget / DevicePagedCache<T>.PageSize, 1, pages);
        Run(q, cache, output, sc, lse, ids, pages, keep, keep < pages ? PageSource.Landmark : PageSource.All, null, null);
    }

    /// <summary>
    /// q [1, Hq, D] against only the listed logical pages of <paramref name="sequence"/>'s kv heads — the decode of a
    /// page-selection policy computed elsewhere (StreamingLLM's sink and recent pages,
    /// <see cref="DevicePagedCache{T}.SinkAndRecentPages"/>; H2O's or Landmark's pages from the host).
    /// <paramref name="pages"/> holds one list for every kv head, or one per kv head; each list ascending, distinct,
    /// within the sequence's pages and not empty.
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, IReadOnlyList<IReadOnlyList<int>> pages, float? scale = null, DeviceTensor<float>? lse = null,
        int sequence = 0)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(pages);
        if (q is not null && q.Rank == 3 && q.Shape[0] != 1) throw new ArgumentException($"q must be [1, Hq, D] for a listed-page decode (one sequence); got {q.ShapeString()}", nameof(q));
        (float sc, int[] ids, int stride) = Check(q!, cache, output, scale, lse, [sequence]);
        int hkv = cache.KvHeads;
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
        Run(q!, cache, output, sc, lse, ids, stride, longest, PageSource.Host, list, counts);
    }

    /// <summary>
    /// H2O on the device (Zhang et al., arXiv:2306.14048, as the CPU's <see cref="Decode.HeavyHitterPolicy"/> at page
    /// granularity): q [1, Hq, D], the new token of <paramref name="state"/>'s sequence, reads per kv head the pages of
    /// its last <see cref="DeviceHeavyHitters.RecentTokens"/> tokens, the pages never read yet (the whole prompt on the
    /// first step), and the kept pages of largest accumulated attention mass within
    /// <see cref="DeviceHeavyHitters.HeavyTokens"/>; kept pages outside the window that do not make the cut are evicted
    /// for good. The step's attention then adds each read page's mass (the mean over the group's query heads of its
    /// softmax share) to its score — all on the device.
    /// </summary>
    public static void ForwardHeavyHitters<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, DeviceHeavyHitters state, float? scale = null, DeviceTensor<float>? lse = null)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(state);
        if (q is not null && q.Rank == 3 && q.Shape[0] != 1) throw new ArgumentException($"q must be [1, Hq, D] for H2O (one sequence); got {q.ShapeString()}", nameof(q));
        (float sc, int[] ids, int pages) = Check(q!, cache, output, scale, lse, [state.Sequence]);
        DeviceHeavyHitters.Step step = state.Begin(cache, q!.Shape[1], pages, out int keep);
        Run(q!, cache, output, sc, lse, ids, pages, keep, PageSource.HeavyHitters, null, null, step);
        state.End(pages);
    }

    /// <summary>
    /// Checks q, the output, lse, the scale and the decoded sequences against the cache; returns the scale, the
    /// sequence of each batch row and the most pages among them.
    /// </summary>
    private static (float Scale, int[] Sequences, int Pages) Check<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, float? scale, DeviceTensor<float>? lse,
        IReadOnlyList<int>? sequences) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentNullException.ThrowIfNull(output);
        int hkv = cache.KvHeads, d = cache.HeadDim;
        if (q.Rank != 3 || q.Shape[0] < 1 || q.Shape[2] != d || q.Shape[1] % hkv != 0)
        {
            throw new ArgumentException($"q must be [B, Hq (a multiple of Hkv={hkv}), D={d}]; got {q.ShapeString()}", nameof(q));
        }
        int b = q.Shape[0], hq = q.Shape[1];
        int[] ids = sequences is null ? [.. Enumerable.Range(0, b)] : [.. sequences];
        if (ids.Length != b) throw new ArgumentException($"sequences must name one sequence per row of q ({b}); got {ids.Length}", nameof(sequences));
        int pages = 0;
        foreach (int id in ids)
        {
            if (!cache.HasSequence(id)) throw new ArgumentOutOfRangeException(nameof(sequences), id, $"the cache has no sequence {id}");
            if (cache.Length(id) == 0) throw new InvalidOperationException($"sequence {id} of the cache is empty: append tokens before decoding");
            pages = Math.Max(pages, cache.Pages(id));
        }
        if (!output.Shape.SequenceEqual(q.Shape)) throw new ArgumentException($"output must be {q.ShapeString()}; got {output.ShapeString()}", nameof(output));
        if (lse is not null && (lse.Rank != 2 || lse.Shape[0] != b || lse.Shape[1] != hq)) throw new ArgumentException($"lse must be [{b}, {hq}]", nameof(lse));
        if (hq / hkv > 16) throw new NotSupportedException($"GPU decoding packs a GQA group into 16 rows; Hq/Hkv = {hq / hkv}");
        if (q.Strides[2] != 1 || q.Strides[1] % 8 != 0 || q.Strides[0] % 8 != 0 || output.Strides[2] != 1 || output.Strides[1] % 8 != 0 || output.Strides[0] % 8 != 0)
        {
            throw new NotSupportedException("GPU decoding needs D contiguous and 16-byte aligned rows");
        }
        float sc = scale ?? 1f / MathF.Sqrt(d);
        if (!(sc > 0) || !float.IsFinite(sc)) throw new ArgumentException($"scale must be finite and > 0; got {sc}", nameof(scale));
        return (sc, ids, pages);
    }

    /// <summary>Where a step's page lists come from: every page, Quest or Landmark scores on the device, or the host.</summary>
    private enum PageSource { All, Quest, Landmark, Host, HeavyHitters }

    /// <summary>
    /// The step: the page lists (at most <paramref name="keep"/> pages a kv head of a sequence; <paramref name="pages"/>
    /// the batch's longest sequence's), split-K decode, merge.
    /// </summary>
    private static void Run<T>(DeviceTensor<T> q, DevicePagedCache<T> cache, DeviceTensor<T> output, float sc, DeviceTensor<float>? lse, int[] ids, int pages, int keep,
        PageSource source, int[]? hostList, int[]? hostCounts, DeviceHeavyHitters.Step? heavy = null) where T : unmanaged
    {
        int hkv = cache.KvHeads, d = cache.HeadDim, hq = q.Shape[1], b = ids.Length;
        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        FlashConfig config = FlashConfig.For(d);
        int shared = (16 + 4 * 16 * config.Warps) * config.HeadDim * 2;
        // Two thread blocks per SM in all: the pages the batch's sequences read (per kv head) cut into equal splits, so a
        // long sequence gets more thread blocks than a short one (the short one's extra splits read nothing and exit).
        long work = 0;
        foreach (int id in ids) work += Math.Min(keep, cache.Pages(id));
        int blocksWanted = Math.Max(1, device.Multiprocessors * 2 / hkv);
        int perSplit = (int)Math.Max(1, (work + blocksWanted - 1) / blocksWanted), splits = (keep + perSplit - 1) / perSplit;
        Dictionary<string, string> defines = config.Defines(typeof(T) == typeof(BFloat16), false, false);
        lock (Gate)
        {
            DeviceBuffer<float>.EnsureLength(ref _partO, (long)b * hq * splits * config.HeadDim);
            DeviceBuffer<float>.EnsureLength(ref _partLse, (long)b * hq * splits);
            UploadBatch(ids);
            bool listed = source != PageSource.All;
            if (listed)
            {
                DeviceBuffer<int>.EnsureLength(ref _list, (long)b * hkv * pages);
                DeviceBuffer<int>.EnsureLength(ref _count, (long)b * hkv);
            }
            switch (source)
            {
                case PageSource.Quest:
                case PageSource.Landmark:
                    _hostListed = null;
                    DeviceBuffer<float>.EnsureLength(ref _bounds, (long)b * hkv * pages);
                    var qp = new QuestParams
                    {
                        Q = q.Buffer.Pointer, Min = cache.Min.Pointer, Max = cache.Max.Pointer, Table = cache.Table.Pointer,
                        Bounds = _bounds!.Pointer, QHead = q.Strides[1], Pages = pages, KvHeads = hkv, Group = hq / hkv, D = d,
                        Mean = cache.Mean.Pointer, Landmark = source == PageSource.Landmark ? 1 : 0,
                        QBatch = q.Strides[0], Lengths = cache.Lengths.Pointer, BatchSeq = _batchSeq!.Pointer, Batch = b, TableStride = cache.CapacityPages,
                        Page = DevicePagedCache<T>.PageSize,
                    };
                    void* qarg = &qp;
                    device.Kernel("select.cu", "quest_bounds", DevicePagedCache<T>.Defines).Launch((uint)(((long)b * pages * hkv + 7) / 8), 1, 1, 256, 0, &qarg);
                    CudaSelectors.TopK(_bounds.Pointer, pages, keep, _list!.Pointer, pages, _count!.Pointer, b * hkv, DevicePagedCache<T>.Defines);
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
                    break;
                case PageSource.HeavyHitters:
                    _hostListed = null;
                    DeviceBuffer<float>.EnsureLength(ref _bounds, (long)hkv * pages);
                    heavy!.Params.Bounds = _bounds!.Pointer;
                    heavy.Params.List = _list!.Pointer;
                    heavy.Params.Count = _count!.Pointer;
                    heavy.Launch("h2o_bounds", (uint)(((long)hkv * pages + 255) / 256));
                    CudaSelectors.TopK(_bounds.Pointer, pages, keep, _list.Pointer, pages, _count.Pointer, hkv, DevicePagedCache<T>.Defines);
                    heavy.Launch("h2o_evict", (uint)hkv);
                    break;
            }
            if (heavy is not null && lse is null)
            {
                lse = heavy.State.RowLse;   // h2o_observe needs the rows' totals
            }
            var p = new CudaDecode.DecodeParams
            {
                Q = q.Buffer.Pointer, K = cache.K.Pointer, V = cache.V.Pointer, O = output.Buffer.Pointer, Lse = lse?.Buffer.Pointer ?? 0,
                PartO = _partO!.Pointer, PartLse = _partLse!.Pointer,
                QBatch = q.Strides[0], QHead = q.Strides[1], KRow = (long)hkv * d, KHead = d, VRow = (long)hkv * d, VHead = d,
                OBatch = output.Strides[0], OHead = output.Strides[1], LseBatch = lse?.Strides[0] ?? 0, LseHead = lse?.Strides[1] ?? 0,
                Heads = hq, Group = hq / hkv, HeadDim = d, SplitLen = 0, Splits = splits, ScaleLog2 = sc * 1.4426950408889634f,
                PageTable = cache.Table.Pointer, PageList = listed ? _list!.Pointer : 0, PageCount = listed ? _count!.Pointer : 0, PageStride = cache.PageStride,
                TableStride = cache.CapacityPages, ListStride = source == PageSource.Host ? Math.Max(keep, 1) : pages, PagesPerSplit = perSplit,
                Lengths = cache.Lengths.Pointer, BatchSeq = _batchSeq!.Pointer, PageLse = heavy?.State.PageLse.Pointer ?? 0,
            };
            void* arg = &p;
            device.Kernel("flash_fwd.cu", "flash_decode", defines).Launch((uint)splits, (uint)hkv, (uint)b, (uint)(config.Warps * 32), shared, &arg);
            device.Kernel("flash_fwd.cu", "decode_merge", defines).Launch((uint)hq, (uint)b, 1, (uint)Math.Min(256, (d + 31) / 32 * 32), 0, &arg);
            if (heavy is { } h2o)
            {
                h2o.Params.Lse = lse!.Buffer.Pointer;
                h2o.Params.LseHead = lse.Strides[1];
                h2o.Params.Warps = config.Warps;
                h2o.Launch("h2o_observe", (uint)hkv);
            }
        }
    }

    /// <summary>The host lists the list buffer holds (buffer, list, counts), or null.</summary>
    private static (DeviceBuffer<int> Buffer, int[] List, int[] Counts)? _hostListed;

    /// <summary>The batch rows' sequence ids the device holds (buffer, ids).</summary>
    private static (DeviceBuffer<int> Buffer, int[] Ids)? _batchUploaded;

    /// <summary>Uploads the batch rows' sequence ids unless the device holds them already (a generation loop decodes the same batch step after step).</summary>
    private static void UploadBatch(int[] ids)
    {
        DeviceBuffer<int>.EnsureLength(ref _batchSeq, ids.Length);
        if (_batchUploaded is { } held && ReferenceEquals(held.Buffer, _batchSeq) && held.Ids.AsSpan().SequenceEqual(ids)) return;
        _batchSeq!.CopyFrom(ids);
        _batchUploaded = (_batchSeq, ids);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct QuestParams
    {
        public ulong Q, Min, Max, Table, Bounds;
        public long QHead;
        public int Pages, KvHeads, Group, D;
        public ulong Mean;
        public int Landmark;
        public long QBatch;
        public ulong Lengths, BatchSeq;
        public int Batch, TableStride, Page;
    }
}

/// <summary>
/// H2O's state on the GPU for one sequence of a <see cref="DevicePagedCache{T}"/>
/// (<see cref="CudaPagedDecode.ForwardHeavyHitters{T}"/>): per kv head and logical page the accumulated attention mass
/// and whether the page is kept or evicted, in device memory; the host keeps only counts, to size each step's top-k.
/// Decode every step (appending at most the recent window between two steps keeps every page judged after a read).
/// </summary>
public sealed class DeviceHeavyHitters : IDisposable
{
    private object? _cache;               // the cache the state belongs to (bound at the first step)
    private int _observed;                // pages [0, _observed) have been read at least once
    private int _alive;                   // read pages not evicted (kept or in the recent window)
    private (object Sequence, int Truncations)? _history;   // the sequence's identity at the last step
    private int _evicting;                // pages the step in flight evicts

    /// <summary>Heavy-hitter and recent budgets in tokens (each rounded up to whole 64-token pages; recent ≥ 1).</summary>
    public DeviceHeavyHitters(int heavyTokens, int recentTokens, int sequence = 0)
    {
        if (heavyTokens < 0) throw new ArgumentOutOfRangeException(nameof(heavyTokens), heavyTokens, "heavy-hitter tokens must be ≥ 0");
        if (recentTokens < 1) throw new ArgumentOutOfRangeException(nameof(recentTokens), recentTokens, "recent tokens must be ≥ 1");
        if (sequence < 0) throw new ArgumentOutOfRangeException(nameof(sequence), sequence, "sequence must be ≥ 0");
        HeavyTokens = heavyTokens;
        RecentTokens = recentTokens;
        Sequence = sequence;
    }

    /// <summary>Tokens of kept pages read besides the recent window.</summary>
    public int HeavyTokens { get; }

    /// <summary>Tokens of the recent window, always read.</summary>
    public int RecentTokens { get; }

    /// <summary>The cache sequence this state follows.</summary>
    public int Sequence { get; }

    /// <summary>Pages each kv head read in the last step.</summary>
    public int LastStepPages { get; private set; }

    internal DeviceBuffer<float> Score { get; private set; } = null!;

    internal DeviceBuffer<int> States { get; private set; } = null!;

    internal DeviceBuffer<float> PageLse { get; private set; } = null!;

    internal DeviceTensor<float> RowLse { get; private set; } = null!;

    private int _kvHeads, _capacity;

    /// <summary>Binds the state at its first step, checks the sequence only grew, and sizes the step's top-k.</summary>
    internal unsafe Step Begin<T>(DevicePagedCache<T> cache, int queryHeads, int pages, out int keep) where T : unmanaged
    {
        if (_cache is null)
        {
            _kvHeads = cache.KvHeads;
            _capacity = cache.CapacityPages;
            Score = DeviceBuffer<float>.Allocate((long)_kvHeads * _capacity);
            States = DeviceBuffer<int>.Allocate((long)_kvHeads * _capacity);
            Score.CopyFrom(new float[Score.Length]);
            States.CopyFrom(new int[States.Length]);
            _cache = cache;
        }
        else if (!ReferenceEquals(_cache, cache))
        {
            throw new InvalidOperationException("this H2O state follows another cache; make one state per (cache, sequence)");
        }
        (object Sequence, int Truncations) history = cache.History(Sequence);
        if (_history is { } seen && (!ReferenceEquals(seen.Sequence, history.Sequence) || seen.Truncations != history.Truncations))
        {
            throw new InvalidOperationException($"sequence {Sequence} was truncated or replaced since the last step; its pages' scores no longer hold: start a new H2O state");
        }
        _history = history;
        if (PageLse is null || PageLse.Length < (long)queryHeads * pages * 8)
        {
            PageLse?.Dispose();
            PageLse = DeviceBuffer<float>.Allocate((long)queryHeads * Math.Max(pages, _capacity) * 8);   // ≤ 8 warps a decode block
        }
        if (RowLse is null || RowLse.Shape[1] != queryHeads)
        {
            RowLse?.Dispose();
            RowLse = DeviceTensor<float>.Allocate(1, queryHeads);
        }
        const int page = DevicePagedCache<T>.PageSize;
        int recentPages = (RecentTokens + page - 1) / page, heavyPages = (HeavyTokens + page - 1) / page;
        int firstRecent = Math.Max(0, pages - recentPages), judged = Math.Min(_observed, firstRecent);
        // Read pages outside the window that are not evicted compete for the heavy slots; none evicted is ever needed.
        int candidates = _alive - (_observed - judged), kept = Math.Min(heavyPages, candidates);
        keep = kept + Math.Max(0, firstRecent - _observed) + (pages - firstRecent);
        _evicting = candidates - kept;   // applied by End, once the step's kernels are launched
        LastStepPages = keep;
        return new Step
        {
            State = this,
            Params = new HeavyParams
            {
                Score = Score.Pointer, States = States.Pointer, PageLse = PageLse.Pointer, Pages = pages, KvHeads = _kvHeads, Group = queryHeads / _kvHeads,
                Capacity = _capacity, FirstRecent = firstRecent, Observed = _observed,
            },
            Defines = DevicePagedCache<T>.Defines,
        };
    }

    /// <summary>After the step: every page up to the sequence's end has been read.</summary>
    internal void End(int pages)
    {
        _alive += pages - _observed - _evicting;
        _observed = pages;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        Score?.Dispose();
        States?.Dispose();
        PageLse?.Dispose();
        RowLse?.Dispose();
    }

    /// <summary>One step's kernel parameters (the list, bounds and LSE pointers are filled in by the decode).</summary>
    internal sealed class Step
    {
        public required DeviceHeavyHitters State;
        public HeavyParams Params;
        public required Dictionary<string, string> Defines;

        public unsafe void Launch(string kernel, uint grid)
        {
            HeavyParams p = Params;
            void* arg = &p;
            CudaBackend.Device.Kernel("select.cu", kernel, Defines).Launch(grid, 1, 1, 256, 0, &arg);
        }
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct HeavyParams
    {
        public ulong Score, States, Bounds, List, Count, PageLse, Lse;
        public long LseHead;
        public int Pages, KvHeads, Group, Capacity, Warps, FirstRecent, Observed;
    }
}
