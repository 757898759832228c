using Attend.Masks;
using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>
/// Attention within buckets: query i sees key j when both carry the same bucket id (and, causally, j ≤ i +
/// Skv − Sq); a negative id drops the token (a dropped query gets output 0 and LSE −∞). This is the shared
/// mechanism of hash-sparse and QK-sparse attention (Pagliardini et al., "Faster Causal Attention Over Large
/// Sequences Through Sparse Flash Attention", arXiv:2306.01160) and of clustered attention: tokens are sorted by
/// (bucket, position), so each bucket is a contiguous run and the scattered pairs become dense blocks on a
/// <see cref="TokenPermutation"/>. The block plan costs O(blocks) to build (<see cref="SortedBucketMask"/> classifies analytically).
/// </summary>
public static class BucketPlan
{
    /// <summary>
    /// Builds the permuted plan. <paramref name="queryBuckets"/>: B·H·Sq ids, (b, h) at (b·H + h)·Sq, in original
    /// positions; <paramref name="keyBuckets"/>: B·Hkv·Skv ids. Query head h attends key head h / (H / Hkv).
    /// </summary>
    public static SparsityPlan Create(int batch, int heads, int kvHeads, int queryLength, int keyLength,
        int[] queryBuckets, int[] keyBuckets, bool causal, int blockSize = 128)
    {
        ArgumentNullException.ThrowIfNull(queryBuckets);
        ArgumentNullException.ThrowIfNull(keyBuckets);
        if (batch < 1 || heads < 1 || kvHeads < 1 || queryLength < 1 || keyLength < 1 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"BucketPlan needs B, H, Hkv, Sq, Skv ≥ 1 with H a multiple of Hkv; got B={batch}, H={heads}, Hkv={kvHeads}, Sq={queryLength}, Skv={keyLength}");
        }
        if (blockSize is not (64 or 128 or 256)) throw new ArgumentOutOfRangeException(nameof(blockSize), blockSize, "blockSize must be 64, 128 or 256");
        if (queryBuckets.LongLength != (long)batch * heads * queryLength)
        {
            throw new ArgumentException($"queryBuckets must hold B·H·Sq = {(long)batch * heads * queryLength} ids; got {queryBuckets.LongLength}", nameof(queryBuckets));
        }
        if (keyBuckets.LongLength != (long)batch * kvHeads * keyLength)
        {
            throw new ArgumentException($"keyBuckets must hold B·Hkv·Skv = {(long)batch * kvHeads * keyLength} ids; got {keyBuckets.LongLength}", nameof(keyBuckets));
        }
        return Build(batch, heads, kvHeads, queryLength, keyLength, queryBuckets, keyBuckets, causal, blockSize, null);
    }

    /// <summary>
    /// Like <see cref="Create"/> with a chosen set of (query bucket, key bucket) pairs instead of equal buckets:
    /// <paramref name="pairs"/> holds, per (b, h), a row-major <c>queryClusters × keyClusters</c> table; bucket ids
    /// must be below those counts.
    /// </summary>
    internal static SparsityPlan Build(int batch, int heads, int kvHeads, int queryLength, int keyLength,
        int[] queryBuckets, int[] keyBuckets, bool causal, int blockSize, ClusterPairs? pairs)
    {
        (int[] queryOrder, int[] sortedQuery) = SortByBucket(queryBuckets, queryLength);
        (int[] keyOrder, int[] sortedKey) = SortByBucket(keyBuckets, keyLength);
        var permutation = new TokenPermutation(batch, heads, kvHeads, queryLength, keyLength, queryOrder, keyOrder);
        var mask = new SortedBucketMask(heads, kvHeads, queryLength, keyLength, sortedQuery, sortedKey, queryOrder, keyOrder, causal, pairs);
        BlockMask blocks = BlockMask.Create(mask, batch, heads, queryLength, keyLength, blockSize, blockSize);
        return new SparsityPlan(blocks, null, permutation);
    }

    /// <summary>Per segment of <paramref name="length"/>: the stable order by bucket, and the buckets in that order.</summary>
    private static (int[] Order, int[] Sorted) SortByBucket(int[] buckets, int length)
    {
        var order = new int[buckets.Length];
        var sorted = new int[buckets.Length];
        var keys = new long[length];
        for (int start = 0; start < buckets.Length; start += length)
        {
            for (int i = 0; i < length; i++) keys[i] = ((long)buckets[start + i] << 32) | (uint)i;
            Array.Sort(keys);
            for (int i = 0; i < length; i++)
            {
                order[start + i] = (int)(uint)keys[i];
                sorted[start + i] = (int)(keys[i] >> 32);
            }
        }
        return (order, sorted);
    }
}

/// <summary>Which (query cluster, key cluster) pairs attend each other, per (batch, head): a row-major table.</summary>
internal sealed record ClusterPairs(int QueryClusters, int KeyClusters, bool[] Allowed)
{
    public bool Allows(int planIndex, int queryCluster, int keyCluster) =>
        Allowed[((long)planIndex * QueryClusters + queryCluster) * KeyClusters + keyCluster];
}

/// <summary>
/// The mask of <see cref="BucketPlan"/> in permuted positions: buckets ascend along each (batch, head) and original
/// positions ascend within a bucket, so a block is Empty when no allowed bucket pair meets in it, and inside one
/// pair of buckets the causal test is a staircase decided from the block's corners. Rows are runs: one per allowed
/// key bucket, cut causally to a prefix.
/// </summary>
internal sealed class SortedBucketMask : Mask
{
    private readonly int _heads, _kvHeads, _sq, _skv;
    private readonly int[] _qBucket, _kBucket, _qPos, _kPos;
    private readonly bool _causal;
    private readonly ClusterPairs? _pairs;

    public SortedBucketMask(int heads, int kvHeads, int sq, int skv, int[] qBucket, int[] kBucket, int[] qPos, int[] kPos, bool causal, ClusterPairs? pairs)
    {
        (_heads, _kvHeads, _sq, _skv, _qBucket, _kBucket, _qPos, _kPos, _causal, _pairs) = (heads, kvHeads, sq, skv, qBucket, kBucket, qPos, kPos, causal, pairs);
    }

    public override bool DependsOnBatch => true;

    public override bool DependsOnHead => true;

    private int QBase(int b, int h) => (b * _heads + h) * _sq;

    private int KBase(int b, int h) => (b * _kvHeads + h / (_heads / _kvHeads)) * _skv;

    private bool Pair(int b, int h, int qc, int kc) => qc >= 0 && kc >= 0 && (_pairs is null ? qc == kc : _pairs.Allows(b * _heads + h, qc, kc));

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        int qi = QBase(batch, head) + q, ki = KBase(batch, head) + kv;
        return Pair(batch, head, _qBucket[qi], _kBucket[ki]) && (!_causal || _kPos[ki] <= _qPos[qi] + extent.CausalOffset);
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        int qb = QBase(batch, head), kb = KBase(batch, head);
        int qLo = _qBucket[qb + q0], qHi = _qBucket[qb + q1 - 1], kLo = _kBucket[kb + k0], kHi = _kBucket[kb + k1 - 1];
        if (qHi < 0 || kHi < 0) return BlockClass.Empty;   // only dropped tokens on one side
        if (_pairs is null ? qHi < kLo || kHi < qLo : !AnyPair(batch, head, Math.Max(0, qLo), qHi, Math.Max(0, kLo), kHi)) return BlockClass.Empty;
        if (qLo != qHi || kLo != kHi || !Pair(batch, head, qLo, kLo)) return BlockClass.Partial;
        if (!_causal) return BlockClass.Full;
        long offset = extent.CausalOffset;
        if (_kPos[kb + k1 - 1] <= _qPos[qb + q0] + offset) return BlockClass.Full;
        if (_kPos[kb + k0] > _qPos[qb + q1 - 1] + offset) return BlockClass.Empty;
        return BlockClass.Partial;
    }

    private bool AnyPair(int batch, int head, int q0, int q1, int k0, int k1)
    {
        for (int qc = q0; qc <= q1; qc++)
            for (int kc = k0; kc <= k1; kc++)
                if (_pairs!.Allows(batch * _heads + head, qc, kc)) return true;
        return false;
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        int qb = QBase(batch, head), kb = KBase(batch, head);
        int lo = Math.Max(0, _qBucket[qb + q0]), hi = _qBucket[qb + q1 - 1];
        if (hi < lo) return;
        ReadOnlySpan<int> keys = _kBucket.AsSpan(kb, _skv);
        if (_pairs is null)
        {
            int start = LowerBound(keys, lo), end = LowerBound(keys, hi + 1);
            if (end > start) ranges.Add((start, end));
            return;
        }
        // Key buckets some query bucket of the block pairs with, merged into sorted ranges.
        for (int kc = 0; kc < _pairs.KeyClusters; kc++)
        {
            bool any = false;
            for (int qc = lo; qc <= hi && !any; qc++) any = _pairs.Allows(batch * _heads + head, qc, kc);
            if (!any) continue;
            int start = LowerBound(keys, kc), end = LowerBound(keys, kc + 1);
            if (end <= start) continue;
            if (ranges.Count > 0 && ranges[^1].End == start) ranges[^1] = (ranges[^1].Start, end);
            else ranges.Add((start, end));
        }
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        var ranges = new List<(int Start, int End)>();
        KeyRanges(extent, batch, head, q0, q1, ranges);
        return ranges.Count == 0 ? (0, 0) : (ranges[0].Start, ranges[^1].End);
    }

    public override int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        int qi = QBase(batch, head) + q, kb = KBase(batch, head);
        int bucket = _qBucket[qi];
        if (bucket < 0) return 0;
        ReadOnlySpan<int> keys = _kBucket.AsSpan(kb, _skv);
        long limit = _qPos[qi] + extent.CausalOffset;
        int count = 0;
        // Key buckets present in [k0, k1), each a run; only the allowed ones, cut to their causal prefix.
        for (int at = k0; at < k1;)
        {
            int kc = keys[at];
            int end = Math.Min(k1, LowerBound(keys, kc + 1));
            if (Pair(batch, head, bucket, kc))
            {
                int hi = end;
                if (_causal)
                {
                    // Positions ascend within the bucket: the allowed keys are a prefix of [at, end).
                    int a = at, b = end;
                    while (a < b)
                    {
                        int mid = (a + b) >>> 1;
                        if (_kPos[kb + mid] <= limit) a = mid + 1;
                        else b = mid;
                    }
                    hi = a;
                }
                if (hi > at)
                {
                    if (count == runs.Length) return -1;   // more runs than room: fall back to Allows per element
                    runs[count++] = (at, hi);
                }
            }
            at = end;
        }
        return count;
    }

    /// <summary>
    /// The same rule over <see cref="CudaData"/>: [query buckets | key buckets | query positions | key positions |
    /// allowed cluster pairs as 0/1], all in permuted order, indexed as <see cref="Allows"/> does.
    /// </summary>
    public override string ToCuda(in MaskExtent extent)
    {
        long oKeyBucket = _qBucket.Length, oQueryPos = oKeyBucket + _kBucket.Length, oKeyPos = oQueryPos + _qPos.Length, oPairs = oKeyPos + _kPos.Length;
        var c = System.Globalization.CultureInfo.InvariantCulture;
        string qi = string.Create(c, $"(((long long)b * {_heads} + h) * {_sq} + q)");
        string ki = string.Create(c, $"(((long long)b * {_kvHeads} + h / {_heads / _kvHeads}) * {_skv} + kv)");
        string qc = $"p.mask_data[{qi}]", kc = string.Create(c, $"p.mask_data[{oKeyBucket}LL + {ki}]");
        string pair = _pairs is null
            ? $"({qc} >= 0 && {qc} == {kc})"
            : string.Create(c, $"({qc} >= 0 && {kc} >= 0 && p.mask_data[{oPairs}LL + (((long long)b * {_heads} + h) * {_pairs.QueryClusters} + {qc}) * {_pairs.KeyClusters} + {kc}] != 0)");
        return _causal
            ? string.Create(c, $"({pair} && (long long)p.mask_data[{oKeyPos}LL + {ki}] <= (long long)p.mask_data[{oQueryPos}LL + {qi}] + {extent.CausalOffset}LL)")
            : pair;
    }

    internal override int[]? CudaData =>
        [.. _qBucket, .. _kBucket, .. _qPos, .. _kPos, .. (_pairs?.Allowed.Select(a => a ? 1 : 0) ?? [])];

    private static int LowerBound(ReadOnlySpan<int> sorted, int value)
    {
        int a = 0, b = sorted.Length;
        while (a < b)
        {
            int mid = (a + b) >>> 1;
            if (sorted[mid] < value) a = mid + 1;
            else b = mid;
        }
        return a;
    }
}

/// <summary>
/// Hash-sparse attention (Pagliardini et al. arXiv:2306.01160, after Reformer's angular LSH arXiv:2001.04451):
/// queries and keys are hashed with one random rotation per key/value head — bucket = argmax over [x·R, −x·R] of the
/// unit vector x, R a Gaussian D × (buckets/2) — and each query attends the keys of its own bucket (causally), run
/// as a <see cref="BucketPlan"/>. Pairs with a large cosine similarity share a bucket more often; a query whose
/// bucket holds no visible key gets output 0, so the error can be large on inputs without that structure.
/// </summary>
public sealed class HashSparseSelector : ISparsitySelector
{
    private readonly int _buckets = 8, _blockSize = 128;

    /// <summary>Number of buckets: even, 2..1024 (default 8).</summary>
    public int Buckets
    {
        get => _buckets;
        init
        {
            if (value < 2 || value > 1024 || value % 2 != 0) throw new ArgumentOutOfRangeException(nameof(Buckets), value, "Buckets must be even, 2..1024");
            _buckets = value;
        }
    }

    /// <summary>Seed of the random rotations.</summary>
    public int Seed { get; init; }

    /// <summary>Block size of the permuted plan: 64, 128 or 256.</summary>
    public int BlockSize
    {
        get => _blockSize;
        init => _blockSize = value is 64 or 128 or 256 ? value : throw new ArgumentOutOfRangeException(nameof(BlockSize), value, "BlockSize must be 64, 128 or 256");
    }

    /// <inheritdoc/>
    public string Name => $"hash(buckets={Buckets})";

    /// <inheritdoc/>
    public override string ToString() => Name;

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        (int batch, int sq, int heads, int d, int skv, int kvHeads, _) = SparsitySelector.CheckInputs(q, k, scale);
        int half = Buckets / 2;
        // One random rotation R [D, buckets/2] per kv head, drawn row by row and stored transposed (a row per
        // projection direction) as the keys operand of the selectors' matrix product.
        var rotations = new PackedPanels[kvHeads];
        var rng = new Random(Seed);
        for (int h = 0; h < kvHeads; h++)
        {
            var transposed = new float[half * d];
            for (int i = 0; i < d; i++)
                for (int j = 0; j < half; j++) transposed[(j * d) + i] = (float)Gaussian.Next(rng);
            rotations[h] = new PackedPanels(transposed, half, d);
        }
        var queryBuckets = new int[batch * heads * sq];
        var keyBuckets = new int[batch * kvHeads * skv];
        Parallel.For(0, batch * heads, index =>
        {
            int b = index / heads, h = index % heads;
            Hash(SparsitySelector.Gather(q, b, h, sq, d, 1f), sq, d, rotations[h / (heads / kvHeads)], queryBuckets.AsSpan(index * sq, sq));
        });
        Parallel.For(0, batch * kvHeads, index =>
        {
            int b = index / kvHeads, h = index % kvHeads;
            Hash(SparsitySelector.Gather(k, b, h, skv, d, 1f), skv, d, rotations[h], keyBuckets.AsSpan(index * skv, skv));
        });
        return BucketPlan.Create(batch, heads, kvHeads, sq, skv, queryBuckets, keyBuckets, causal, BlockSize);
    }

    private static void Hash(float[] rows, int length, int d, PackedPanels rotation, Span<int> buckets)
    {
        const int chunk = 256;   // rows per product: bounds the projection buffer at 256 × buckets/2
        int half = rotation.N;
        var projections = new float[chunk * half];
        for (int s0 = 0; s0 < length; s0 += chunk)
        {
            int n = Math.Min(chunk, length - s0);
            ScoreGemm.Multiply(rows.AsSpan(s0 * d, n * d), n, d, rotation, 0, half, projections);
            for (int r = 0; r < n; r++)
            {
                ReadOnlySpan<float> projection = projections.AsSpan(r * half, half);
                int best = 0;
                float bestValue = float.NegativeInfinity;
                for (int j = 0; j < half; j++)
                {
                    // The argmax over [xR, −xR] does not depend on |x|: no normalisation needed. NaN rows land in bucket 0.
                    if (projection[j] > bestValue) (best, bestValue) = (j, projection[j]);
                    if (-projection[j] > bestValue) (best, bestValue) = (j + half, -projection[j]);
                }
                buckets[s0 + r] = best;
            }
        }
    }
}
