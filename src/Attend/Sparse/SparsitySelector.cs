using System.Diagnostics;
using System.Numerics;
using System.Runtime.Intrinsics;
using Attend.Cpu;
using Attend.Masks;
using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>
/// A content-based sparse-attention method: looks at the queries and keys and decides which (query, key) regions to
/// compute, as a <see cref="SparsityPlan"/> for the shared block-sparse executor. Selection is part of the cost of
/// a method, so implementations estimate cheaply (pooled blocks, a few sampled queries, strided products).
/// </summary>
public interface ISparsitySelector
{
    /// <summary>Short name with the parameters that matter, e.g. <c>xattention(t=0.9,s=8)</c>.</summary>
    string Name { get; }

    /// <summary>
    /// Builds the plan for <paramref name="q"/> [B, Sq, H, D] against <paramref name="k"/> [B, Skv, Hkv, D].
    /// With <paramref name="causal"/> (bottom-right aligned, as <see cref="AttentionOptions.Causal"/>) the plan
    /// contains the causal mask itself, so it is run with Causal unset.
    /// </summary>
    SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged;
}

/// <summary>
/// A selector that also looks at the values (e.g. to measure output error while choosing, as
/// <see cref="AutoSelector"/> does); <see cref="SparseAttention.Forward"/> hands them over.
/// </summary>
public interface IValueAwareSelector : ISparsitySelector
{
    /// <summary>Builds the plan from queries, keys and values.</summary>
    SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, bool causal = true, float? scale = null, KernelTuning? tuning = null) where T : unmanaged;
}

/// <summary>
/// Base of the built-in selectors: validates shapes, gathers each head's queries (scaled) and keys into contiguous
/// float rows, runs <see cref="SelectHead"/> for every (batch, head) in parallel, and assembles the chosen key
/// blocks (and key tokens) into one plan. Blocks are square (<see cref="BlockSize"/> queries × keys); with causal
/// attention the blocks on the diagonal are Partial under <see cref="Mask.Causal"/>, those below it Full.
/// </summary>
public abstract class SparsitySelector : ISparsitySelector
{
    private int _blockSize = 128;

    /// <inheritdoc/>
    public abstract string Name { get; }

    /// <summary>Query and key block size of the plan: 64, 128 or 256 (default 128, as MInference/FlexPrefill/XAttention).</summary>
    public int BlockSize
    {
        get => _blockSize;
        init
        {
            if (value is not (64 or 128 or 256)) throw new ArgumentOutOfRangeException(nameof(BlockSize), value, "BlockSize must be 64, 128 or 256");
            _blockSize = value;
        }
    }

    /// <summary>Worker threads for selection; 0 = all cores.</summary>
    public int Threads { get; init; }

    /// <inheritdoc/>
    public override string ToString() => Name;

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged =>
        Plan(q, k, causal, scale, packedKeys: null);

    /// <summary>
    /// Whether <see cref="SelectHead"/> scores keys one by one (<see cref="HeadSelection.PackedKeys"/>): then
    /// <see cref="SparseAttention.Forward"/> packs K and V for the executor before selection and the heads read its K
    /// panels instead of packing their own.
    /// </summary>
    internal virtual bool ReadsPackedKeys => false;

    /// <summary><see cref="Plan{T}(TensorView{T}, TensorView{T}, bool, float?)"/> reading keys from the executor's K panels when given.</summary>
    internal SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal, float? scale, Cpu.PackedKv? packedKeys) where T : unmanaged
    {
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = CheckInputs(q, k, scale);
        Validate(sq, skv);

        var rows = new HeadRows[batch * heads];
        var parallel = new ParallelOptions { MaxDegreeOfParallelism = Threads > 0 ? Threads : Environment.ProcessorCount };
        // Each worker gathers its heads into the same buffers (and packs keys into the same panels): a fresh 16 MB
        // array per head and input at S = 32768, D = 128 cost more in page faults than the copy itself (gathering a
        // head's q and k took 33–38 ms on one core of the 2-core EPYC, session 10).
        // Selectors that read every head's block means get them from one pass over all heads (anchor at S 32768, H 8,
        // D 128: 156 → 142 ms a plan, pooled 61 → 51; medians of 12 in one process, session 12).
        float[]? pooledQueries = UsesPooledQueries ? PoolEveryHead(q, s, BlockSize, parallel) : null;
        int queryBlocks = (sq + BlockSize - 1) / BlockSize;
        Parallel.For(0, batch * heads, parallel, HeadBuffers.Rent, (index, _, buffers) =>
        {
            int b = index / heads, h = index % heads;
            int hk = h / (heads / kvHeads);
            var head = new HeadSelection(b, h, sq, skv, d, BlockSize, causal, new ViewRows<T>(q, b, h, s), new ViewRows<T>(k, b, hk, 1f), buffers,
                packedKeys?.KeyPanels(b, hk));
            if (pooledQueries is not null) head.SetPooledQueries(pooledQueries.AsSpan(index * queryBlocks * d, queryBlocks * d).ToArray());
            SelectHead(head);
            rows[index] = head.Finish();
            return buffers;
        }, HeadBuffers.Return);

        Mask? causalMask = causal ? Mask.Causal : null;
        int bs = BlockSize;
        long offset = (long)skv - sq;
        BlockMask blocks = BlockMask.FromBlocks(batch, heads, sq, skv, bs, bs,
            (b, h, qb) => rows[b * heads + h].Blocks[qb].Select(kb => (kb, Classify(qb, kb, bs, sq, skv, offset, causal))), causalMask);
        TokenSet? tokens = rows.Any(r => r.Tokens is not null)
            ? TokenSet.Create(batch, heads, sq, skv, bs, (b, h, qb) => rows[b * heads + h].Tokens?[qb] ?? [], causalMask)
            : null;
        return new SparsityPlan(blocks, tokens);
    }

    /// <summary>
    /// Checks q [B, Sq, H, D] and k [B, Skv, Hkv, D] (Hkv dividing H, every extent ≥ 1) and the scale; returns the
    /// sizes and the effective scale. Shared by every selector, built-in or not.
    /// </summary>
    internal static (int Batch, int QueryLength, int Heads, int HeadDim, int KeyLength, int KvHeads, float Scale) CheckInputs<T>(
        TensorView<T> q, TensorView<T> k, float? scale) where T : unmanaged => CheckShapes(q.Shape, k.Shape, scale);

    /// <summary>The checks of <see cref="CheckInputs"/> on the shapes alone (the GPU selectors' device tensors use them too).</summary>
    internal static (int Batch, int QueryLength, int Heads, int HeadDim, int KeyLength, int KvHeads, float Scale) CheckShapes(
        ReadOnlySpan<int> q, ReadOnlySpan<int> k, float? scale)
    {
        if (q.Length != 4) throw new ArgumentException($"q must be [B, Sq, H, D]; got {TensorView<int>.FormatShape(q)}", nameof(q));
        if (k.Length != 4) throw new ArgumentException($"k must be [B, Skv, Hkv, D]; got {TensorView<int>.FormatShape(k)}", nameof(k));
        int batch = q[0], sq = q[1], heads = q[2], d = q[3];
        int skv = k[1], kvHeads = k[2];
        if (k[0] != batch || k[3] != d || kvHeads < 1 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"k must be [B={batch}, Skv, Hkv dividing H={heads}, D={d}]; got {TensorView<int>.FormatShape(k)}", nameof(k));
        }
        if (batch < 1 || sq < 1 || skv < 1 || heads < 1 || d < 1)
        {
            throw new ArgumentException($"q and k need every extent ≥ 1; got q {TensorView<int>.FormatShape(q)}, k {TensorView<int>.FormatShape(k)}", nameof(q));
        }
        float s = scale ?? 1f / MathF.Sqrt(d);
        if (!float.IsFinite(s) || s < 0) throw new ArgumentException($"scale must be finite and ≥ 0; got {s}", nameof(scale));
        return (batch, sq, heads, d, skv, kvHeads, s);
    }

    /// <summary>Whether <see cref="SelectHead"/> reads <see cref="HeadSelection.PooledQueries"/>.</summary>
    private protected virtual bool UsesPooledQueries => false;

    /// <summary>
    /// Block means of every head's queries [B, H, query blocks, D], in one pass over the rows of all heads: a token's
    /// heads are contiguous, so each page of q is read once instead of once per head.
    /// </summary>
    private static float[] PoolEveryHead<T>(TensorView<T> q, float scale, int blockSize, ParallelOptions parallel) where T : unmanaged
    {
        int batch = q.Shape[0], sq = q.Shape[1], heads = q.Shape[2], d = q.Shape[3];
        int blocks = (sq + blockSize - 1) / blockSize;
        var pooled = new float[(long)batch * heads * blocks * d];
        if (typeof(T) == typeof(float) && q.Strides[3] == 1)
        {
            PoolEveryHeadInPlace((TensorView<float>)(object)q, scale, blockSize, parallel, pooled);
            return pooled;
        }
        // Block by block, each head's rows of the block in turn: a block's rows of every head (BlockSize · H · D floats,
        // 512 KB at 128 × 8 × 128) stay in cache while the heads pass over them.
        Parallel.For(0, batch * blocks, parallel, () => new float[d], (index, _, row) =>
        {
            int b = index / blocks, blk = index % blocks;
            for (int h = 0; h < heads; h++)
            {
                HeadSelection.MeanOfRows(new ViewRows<T>(q, b, h, scale), blk * blockSize, Math.Min((blk + 1) * blockSize, sq), row,
                    pooled.AsSpan((int)((((long)((b * heads) + h) * blocks) + blk) * d), d));
            }
            return row;
        }, _ => { });
        return pooled;
    }

    /// <summary>
    /// <see cref="PoolEveryHead"/> for float rows of unit element stride, read in place token by token (each token's
    /// heads in turn: memory in order for [B, S, H, D]), without copying each row first. The same sums in the same order
    /// (each element scaled, then added; the total times 1/rows). Anchor at S 32768, H 8, D 128 (2-core EPYC): 12.3 ms a
    /// plan against 20.7 for the row-copying pass (session 13).
    /// </summary>
    private static unsafe void PoolEveryHeadInPlace(TensorView<float> q, float scale, int blockSize, ParallelOptions parallel, float[] pooled)
    {
        int batch = q.Shape[0], sq = q.Shape[1], heads = q.Shape[2], d = q.Shape[3];
        int blocks = (sq + blockSize - 1) / blockSize;
        long s0 = q.Strides[0], s1 = q.Strides[1], s2 = q.Strides[2];
        using PinnedView<float> pinned = q.Pin();
        float* origin = pinned.Pointer;
        Parallel.For(0, batch * blocks, parallel, index =>
        {
            int b = index / blocks, blk = index % blocks;
            int r0 = blk * blockSize, r1 = Math.Min(r0 + blockSize, sq);
            fixed (float* means = &pooled[(long)b * heads * blocks * d])
            {
                for (int t = r0; t < r1; t++)
                {
                    float* token = origin + (b * s0) + (t * s1);
                    for (int h = 0; h < heads; h++) AddScaled(token + (h * s2), scale, means + ((((long)h * blocks) + blk) * d), d);
                }
            }
            float inv = 1f / (r1 - r0);
            for (int h = 0; h < heads; h++) Linear.Vectors.Scale(pooled.AsSpan((int)((((long)((b * heads) + h) * blocks) + blk) * d), d), inv);
        });
    }

    /// <summary>y[i] += x[i]·a (the product rounded, then added: no fused multiply-add), by 512-bit vectors where accelerated.</summary>
    private static unsafe void AddScaled(float* x, float a, float* y, int n)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            var va = Vector512.Create(a);
            for (; i <= n - 16; i += 16) Vector512.Store(Vector512.Load(y + i) + (Vector512.Load(x + i) * va), y + i);
        }
        for (; i < n; i++) y[i] += x[i] * a;
    }

    /// <summary>Rejects parameters that do not fit the sequence lengths (overridden by selectors with such parameters).</summary>
    private protected virtual void Validate(int queryLength, int keyLength) { }

    /// <summary>Chooses the key blocks (and optionally tokens) of every query block of one head.</summary>
    private protected abstract void SelectHead(HeadSelection head);

    /// <summary>Lets a combining selector (per head) run this selector's choice on one head.</summary>
    internal void SelectInto(HeadSelection head)
    {
        Validate(head.QueryLength, head.KeyLength);
        SelectHead(head);
    }

    private static BlockClass Classify(int qb, int kb, int bs, int sq, int skv, long offset, bool causal)
    {
        if (!causal) return BlockClass.Full;
        long q0 = (long)qb * bs, q1 = Math.Min(q0 + bs, sq), k0 = (long)kb * bs, k1 = Math.Min(k0 + bs, skv);
        if (k0 > q1 - 1 + offset) return BlockClass.Empty;
        return k1 - 1 <= q0 + offset ? BlockClass.Full : BlockClass.Partial;
    }

    /// <summary>Rows [length, D] of (batch b, head h) as floats times <paramref name="scale"/>, in a fresh array.</summary>
    internal static float[] Gather<T>(TensorView<T> x, int b, int h, int length, int d, float scale) where T : unmanaged
    {
        var rows = new float[(long)length * d];
        var source = new ViewRows<T>(x, b, h, scale);
        for (int i = 0; i < length; i++) source.CopyRow(i, rows.AsSpan(i * d, d));
        return rows;
    }

    internal readonly record struct HeadRows(List<int>[] Blocks, List<int>[]? Tokens);
}

/// <summary>Rows [length, D] of one (batch, head), read on demand as floats.</summary>
internal interface IRowSource
{
    void CopyRow(int index, Span<float> row);
}

/// <summary>Rows [length, D] of an array.</summary>
internal sealed class ArrayRows(float[] rows, int d) : IRowSource
{
    public void CopyRow(int index, Span<float> row) => rows.AsSpan(index * d, d).CopyTo(row);
}

/// <summary>Rows of (batch b, head h) of a [B, S, H, D] view, times a scale (the rows SparsitySelector.Gather writes).</summary>
internal sealed class ViewRows<T>(TensorView<T> x, int b, int h, float scale) : IRowSource where T : unmanaged
{
    /// <summary>Rows read ahead of the one copied: consecutive rows of one head lie a page apart (H·D floats), so each
    /// waited on memory (16 MB of rows at S 32768, D 128: 7 ms a head for pooling, session 12).</summary>
    private const int Ahead = 8;

    public void CopyRow(int index, Span<float> row)
    {
        x.PrefetchRow(b, index + Ahead, h);
        x.CopyRow(b, index, h, row);
        if (scale != 1f) Linear.Vectors.Scale(row, scale);
    }
}

/// <summary>
/// A worker's arrays, reused from one head to the next (see <see cref="SparsitySelector.Plan{T}(TensorView{T}, TensorView{T}, bool, float?)"/>) and from one plan to the
/// next: idle sets wait in a pool through weak references (the GC may take them). Fresh arrays per plan cost a page fault
/// per 4 KB on every call (two 2 MB gathers per worker at S = 8192, D 64; two 16 MB ones at 32768, D 128).
/// </summary>
internal sealed class HeadBuffers
{
    private static readonly System.Collections.Concurrent.ConcurrentBag<WeakReference<HeadBuffers>> Idle = [];

    public float[]? Queries, Keys, Panels, Scratch;
    public double[]? Doubles;
    public sbyte[]?[] Codes = new sbyte[2][];

    /// <summary>An idle set if one is still alive, else a new one.</summary>
    public static HeadBuffers Rent()
    {
        while (Idle.TryTake(out WeakReference<HeadBuffers>? idle))
        {
            if (idle.TryGetTarget(out HeadBuffers? buffers)) return buffers;
        }
        return new HeadBuffers();
    }

    /// <summary>Offers a set to the next plan (nothing of it may be referenced after this).</summary>
    public static void Return(HeadBuffers buffers) => Idle.Add(new WeakReference<HeadBuffers>(buffers));
}

/// <summary>What a selector sees of one (batch, head) and where it puts its choices.</summary>
internal sealed class HeadSelection
{
    private readonly HeadBuffers? _buffers;
    private readonly List<int>[] _blocks;
    private List<int>[]? _tokens;
    private PackedPanels? _packedKeys;
    private readonly IRowSource _querySource, _keySource;
    private float[]? _queries, _keys, _pooledQueries, _pooledKeys;

    /// <summary>
    /// A head whose rows are read from their sources only as the selector asks: a selector that needs block means, a
    /// few rows and packed keys never copies the whole head (two 16 MB strided gathers at S 32768, D 128).
    /// </summary>
    public HeadSelection(int batch, int head, int queryLength, int keyLength, int headDim, int blockSize, bool causal, IRowSource queries, IRowSource keys,
        HeadBuffers? buffers = null, PackedPanels? packedKeys = null)
    {
        _packedKeys = packedKeys;
        _querySource = queries;
        _keySource = keys;
        _buffers = buffers;
        Batch = batch;
        Head = head;
        QueryLength = queryLength;
        KeyLength = keyLength;
        HeadDim = headDim;
        BlockSize = blockSize;
        Causal = causal;
        _blocks = new List<int>[QueryBlocks];
        for (int i = 0; i < _blocks.Length; i++) _blocks[i] = [];
    }

    public int Batch { get; }
    public int Head { get; }
    public int QueryLength { get; }
    public int KeyLength { get; }
    public int HeadDim { get; }
    public int BlockSize { get; }
    public bool Causal { get; }

    /// <summary>Queries [Sq, D], already multiplied by the softmax scale (gathered on first use).</summary>
    public float[] Queries => _queries ??= GatherAll(_querySource, QueryLength, keys: false);

    /// <summary>Supplies <see cref="PooledQueries"/> computed with every head's (the same sums).</summary>
    public void SetPooledQueries(float[] pooled) => _pooledQueries = pooled;

    /// <summary>Mean query of each block [query blocks, D], scaled as <see cref="Queries"/>.</summary>
    public float[] PooledQueries => _pooledQueries ??= PoolRows(_queries is not null ? new ArrayRows(_queries, HeadDim) : _querySource, QueryLength);

    /// <summary>Copies the query rows <paramref name="rows"/> (scaled) into <paramref name="destination"/> [rows.Length, D].</summary>
    public void CopyQueryRows(ReadOnlySpan<int> rows, Span<float> destination)
    {
        int d = HeadDim;
        for (int i = 0; i < rows.Length; i++)
        {
            if (_queries is not null) _queries.AsSpan(rows[i] * d, d).CopyTo(destination.Slice(i * d, d));
            else _querySource.CopyRow(rows[i], destination.Slice(i * d, d));
        }
    }

    /// <summary>Keys [Skv, D] (gathered on first use).</summary>
    public float[] Keys => _keys ??= GatherAll(_keySource, KeyLength, keys: true);

    /// <summary>Mean key of each block [key blocks, D].</summary>
    public float[] PooledKeys => _pooledKeys ??= PoolRows(_keys is not null ? new ArrayRows(_keys, HeadDim) : _keySource, KeyLength);

    /// <summary>All rows of a source into the worker's array for them (a fresh one without a worker or at another size).</summary>
    private float[] GatherAll(IRowSource source, int length, bool keys)
    {
        int d = HeadDim;
        float[]? slot = keys ? _buffers?.Keys : _buffers?.Queries;
        float[] rows = slot is not null && slot.Length == (long)length * d ? slot : new float[(long)length * d];
        if (_buffers is not null)
        {
            if (keys) _buffers.Keys = rows;
            else _buffers.Queries = rows;
        }
        for (int i = 0; i < length; i++) source.CopyRow(i, rows.AsSpan(i * d, d));
        return rows;
    }

    public int QueryBlocks => (QueryLength + BlockSize - 1) / BlockSize;
    public int KeyBlocks => (KeyLength + BlockSize - 1) / BlockSize;

    /// <summary>Skv − Sq: query i sees keys j ≤ i + Offset when causal.</summary>
    public int Offset => KeyLength - QueryLength;

    /// <summary>
    /// A worker's scratch array of at least <paramref name="length"/> floats, reused by the next head (contents
    /// undefined); one user at a time.
    /// </summary>
    public float[] Scratch(long length)
    {
        if (_buffers is null) return new float[length];
        if (_buffers.Scratch is null || _buffers.Scratch.Length < length) _buffers.Scratch = new float[length];
        return _buffers.Scratch;
    }

    /// <summary>
    /// A worker's byte array <paramref name="slot"/> (0 or 1) of at least <paramref name="length"/> entries, the first
    /// <paramref name="length"/> zero, reused by the next head (SALE's integer codes: 8 MB a head at S 32768, D 128,
    /// which as fresh arrays cost page faults).
    /// </summary>
    public sbyte[] Codes(int slot, long length)
    {
        if (_buffers is null) return new sbyte[length];
        sbyte[]? codes = _buffers.Codes[slot];
        if (codes is null || codes.Length < length) return _buffers.Codes[slot] = new sbyte[length];
        codes.AsSpan(0, (int)length).Clear();
        return codes;
    }

    /// <summary>As <see cref="Scratch"/>, float64.</summary>
    public double[] DoubleScratch(long length)
    {
        if (_buffers is null) return new double[length];
        if (_buffers.Doubles is null || _buffers.Doubles.Length < length) _buffers.Doubles = new double[length];
        return _buffers.Doubles;
    }

    /// <summary>Keys packed for <see cref="ScoreGemm"/>: the executor's K panels when given, else built on first use.</summary>
    public PackedPanels PackedKeys
    {
        get
        {
            if (_packedKeys is not null) return _packedKeys;
            _packedKeys = _keys is not null
                ? new PackedPanels(_keys, KeyLength, HeadDim, _buffers?.Panels)
                : new PackedPanels(_keySource, KeyLength, HeadDim, _buffers?.Panels);
            if (_buffers is not null) _buffers.Panels = _packedKeys.Data;
            return _packedKeys;
        }
    }

    /// <summary>Number of keys query <paramref name="q"/> may see (Skv when not causal; 0 for rows that see none).</summary>
    public int VisibleKeys(int q) => Causal ? Math.Clamp(q + Offset + 1, 0, KeyLength) : KeyLength;

    /// <summary>Key blocks that query block <paramref name="qb"/> can reach at all (its last row's visible keys).</summary>
    public int VisibleKeyBlocks(int qb)
    {
        int last = Math.Min((qb + 1) * BlockSize, QueryLength) - 1;
        return (VisibleKeys(last) + BlockSize - 1) / BlockSize;
    }

    /// <summary>The key block holding the diagonal of query block <paramref name="qb"/> (its last row's last key); −1 if none.</summary>
    public int DiagonalBlock(int qb) => VisibleKeyBlocks(qb) - 1;

    public void AddBlock(int qb, int kb)
    {
        if (kb >= 0 && kb < VisibleKeyBlocks(qb)) _blocks[qb].Add(kb);
    }

    public void AddToken(int qb, int key)
    {
        _tokens ??= CreateLists(QueryBlocks);
        int last = Math.Min((qb + 1) * BlockSize, QueryLength) - 1;
        if (key >= 0 && key < VisibleKeys(last)) _tokens[qb].Add(key);
    }

    /// <summary>
    /// Adds key <paramref name="firstKey"/> + i for every <paramref name="scores"/>[i] ≥ <paramref name="cut"/> (NaN
    /// never), in order: one vector compare per 16 scores, since most scores of a sparse row fall below the cut.
    /// </summary>
    public void AddTokensAtLeast(int qb, ReadOnlySpan<float> scores, int firstKey, float cut)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            var threshold = Vector512.Create(cut);
            for (; i <= scores.Length - Vector512<float>.Count; i += Vector512<float>.Count)
            {
                ulong bits = Vector512.GreaterThanOrEqual(Vector512.Create(scores.Slice(i, Vector512<float>.Count)), threshold).ExtractMostSignificantBits();
                for (; bits != 0; bits &= bits - 1) AddToken(qb, firstKey + i + BitOperations.TrailingZeroCount(bits));
            }
        }
        for (; i < scores.Length; i++)
        {
            if (scores[i] >= cut) AddToken(qb, firstKey + i);
        }
    }

    /// <summary>Mean of each block of the source's rows [length, D] → [blocks, D].</summary>
    private float[] PoolRows(IRowSource source, int length)
    {
        int d = HeadDim, blocks = (length + BlockSize - 1) / BlockSize;
        var pooled = new float[blocks * d];
        var row = new float[d];
        for (int blk = 0; blk < blocks; blk++) MeanOfRows(source, blk * BlockSize, Math.Min((blk + 1) * BlockSize, length), row, pooled.AsSpan(blk * d, d));
        return pooled;
    }

    /// <summary>mean ← the mean of the source's rows [r0, r1) (mean starts at 0; row is scratch of D floats).</summary>
    public static void MeanOfRows(IRowSource source, int r0, int r1, Span<float> row, Span<float> mean)
    {
        for (int r = r0; r < r1; r++)
        {
            source.CopyRow(r, row);
            Linear.Vectors.Axpy(1f, row, mean);
        }
        float inv = 1f / (r1 - r0);
        for (int c = 0; c < mean.Length; c++) mean[c] *= inv;
    }

    public SparsitySelector.HeadRows Finish()
    {
        foreach (List<int> row in _blocks) SortDistinct(row);
        if (_tokens is not null)
            foreach (List<int> row in _tokens) SortDistinct(row);
        return new(_blocks, _tokens);
    }

    private static void SortDistinct(List<int> row)
    {
        row.Sort();
        int w = 0;
        for (int i = 0; i < row.Count; i++)
        {
            if (w == 0 || row[i] != row[w - 1]) row[w++] = row[i];
        }
        row.RemoveRange(w, row.Count - w);
    }

    private static List<int>[] CreateLists(int count)
    {
        var lists = new List<int>[count];
        for (int i = 0; i < count; i++) lists[i] = [];
        return lists;
    }
}

/// <summary>Timing of one selector run: what the benchmark reports.</summary>
public readonly record struct SparseRunTimes(TimeSpan Selection, TimeSpan Execution)
{
    /// <summary>Selection plus execution.</summary>
    public TimeSpan Total => Selection + Execution;
}

/// <summary>Content-based sparse attention end to end: select a plan, then run it on the shared executor.</summary>
public static class SparseAttention
{
    /// <summary>
    /// Builds <paramref name="selector"/>'s plan for (q, k) and computes attention under it. <paramref name="options"/>
    /// may carry Scale, Softcap, ALiBi and Bias; Causal is handled by the plan; Mask, Predicate and Plan must be unset.
    /// </summary>
    /// <returns>The plan that was run and the time of its two phases.</returns>
    public static (SparsityPlan Plan, SparseRunTimes Times) Forward<T>(
        ISparsitySelector selector, TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> output,
        AttentionOptions? options = null, TensorView<float> lse = default, KernelTuning? tuning = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(selector);
        options ??= AttentionOptions.Default;
        if (options.Mask is not null || options.Predicate is not null || options.Plan is not null)
        {
            throw new ArgumentException("a selector builds the whole plan: options.Mask, Predicate and Plan must be unset", nameof(options));
        }
        // Selectors that score keys one by one (anchor, vertical-slash, FlexPrefill) read the executor's K panels: K and V
        // are packed once, before selection, instead of once per head by the selector and again by the executor. The
        // pack counts as execution, where it was: the executor packs K and V on every call, dense or sparse. (Anchor at
        // S 32768, H 8, D 128: a head's keys packed from the [B, S, H, D] view took 6–7 ms on one core, ≈ 26 ms of a
        // 126 ms selection on two; docs/perf/sparse.md, session 13.)
        long start = Stopwatch.GetTimestamp();
        PackedKv? packed = null;
        if (selector is SparsitySelector { ReadsPackedKeys: true })
        {
            Attention.RequireElementType<T>();
            tuning ??= KernelTuning.Default;
            Attention.Validate(tuning);
            packed = PackedKv.Pack(k, v, AttentionShape.Of(q, k, v), tuning.EffectiveThreads);
        }
        try
        {
            TimeSpan pack = Stopwatch.GetElapsedTime(start);
            start = Stopwatch.GetTimestamp();
            SparsityPlan plan = selector switch
            {
                IValueAwareSelector valueAware => valueAware.Plan(q, k, v, options.Causal, options.Scale, tuning),
                SparsitySelector builtIn when packed is not null => builtIn.Plan(q, k, options.Causal, options.Scale, packed),
                _ => selector.Plan(q, k, options.Causal, options.Scale),
            };
            TimeSpan selection = Stopwatch.GetElapsedTime(start);
            start = Stopwatch.GetTimestamp();
            Attention.Forward(q, k, v, output, options with { Causal = false, Plan = plan }, lse, tuning, packed);
            return (plan, new SparseRunTimes(selection, pack + Stopwatch.GetElapsedTime(start)));
        }
        finally
        {
            packed?.Dispose();
        }
    }
}
