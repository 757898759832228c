namespace Attend.Masks;

/// <summary>
/// A reordering of tokens per (batch, head) that a <see cref="SparsityPlan"/> is expressed in: the executor gathers
/// query row <c>QueryOrder(b, h)[i]</c> to position i and key/value row <c>KeyOrder(b, hkv)[j]</c> to position j, runs
/// the plan there, and scatters the outputs (and LSE) back. Methods that group related tokens — hash buckets
/// (Reformer arXiv:2001.04451, hash-sparse in Pagliardini et al. arXiv:2306.01160), clusters (Routing Transformer
/// arXiv:2003.05997), dropped tokens (QK-sparse, same paper) — turn scattered pairs into dense blocks this way.
/// Costs one O(B·S·H·D) copy of q, k, v and o; no O(S²) memory.
/// </summary>
public sealed class TokenPermutation
{
    private readonly int[] _queryOrder, _keyOrder, _queryInverse, _keyInverse;

    /// <summary>
    /// Builds a permutation. <paramref name="queryOrder"/> holds B·H orders of Sq positions, (b, h) at
    /// (b·H + h)·Sq; <paramref name="keyOrder"/> B·Hkv orders of Skv positions, (b, hkv) at (b·Hkv + hkv)·Skv. Query
    /// head h uses key order h / (H / Hkv) (GQA groups share their keys). Each order must be a permutation.
    /// </summary>
    public TokenPermutation(int batch, int heads, int kvHeads, int queryLength, int keyLength, int[] queryOrder, int[] keyOrder)
    {
        ArgumentNullException.ThrowIfNull(queryOrder);
        ArgumentNullException.ThrowIfNull(keyOrder);
        if (batch < 1 || heads < 1 || kvHeads < 1 || queryLength < 1 || keyLength < 1 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"TokenPermutation needs B, H, Hkv, Sq, Skv ≥ 1 with H a multiple of Hkv; got B={batch}, H={heads}, Hkv={kvHeads}, Sq={queryLength}, Skv={keyLength}");
        }
        if (queryOrder.LongLength != (long)batch * heads * queryLength)
        {
            throw new ArgumentException($"queryOrder must hold B·H·Sq = {(long)batch * heads * queryLength} positions; got {queryOrder.LongLength}", nameof(queryOrder));
        }
        if (keyOrder.LongLength != (long)batch * kvHeads * keyLength)
        {
            throw new ArgumentException($"keyOrder must hold B·Hkv·Skv = {(long)batch * kvHeads * keyLength} positions; got {keyOrder.LongLength}", nameof(keyOrder));
        }
        Batch = batch;
        Heads = heads;
        KvHeads = kvHeads;
        QueryLength = queryLength;
        KeyLength = keyLength;
        _queryOrder = queryOrder;
        _keyOrder = keyOrder;
        _queryInverse = Invert(queryOrder, queryLength, nameof(queryOrder));
        _keyInverse = Invert(keyOrder, keyLength, nameof(keyOrder));
    }

    /// <summary>B.</summary>
    public int Batch { get; }

    /// <summary>Query heads H.</summary>
    public int Heads { get; }

    /// <summary>Key/value heads Hkv.</summary>
    public int KvHeads { get; }

    /// <summary>Sq.</summary>
    public int QueryLength { get; }

    /// <summary>Skv.</summary>
    public int KeyLength { get; }

    /// <summary>Original query positions in permuted order for (batch, query head).</summary>
    public ReadOnlySpan<int> QueryOrder(int batch, int head) => _queryOrder.AsSpan((batch * Heads + head) * QueryLength, QueryLength);

    /// <summary>Original key positions in permuted order for (batch, key/value head).</summary>
    public ReadOnlySpan<int> KeyOrder(int batch, int kvHead) => _keyOrder.AsSpan((batch * KvHeads + kvHead) * KeyLength, KeyLength);

    /// <summary>Where original query <paramref name="q"/> of (batch, head) sits in permuted order.</summary>
    public int PermutedQuery(int batch, int head, int q) => _queryInverse[(batch * Heads + head) * QueryLength + q];

    /// <summary>Where original key <paramref name="kv"/> of (batch, query head) sits in permuted order.</summary>
    public int PermutedKey(int batch, int head, int kv) => _keyInverse[(batch * KvHeads + head / (Heads / KvHeads)) * KeyLength + kv];

    private static int[] Invert(int[] order, int length, string name)
    {
        var inverse = new int[order.Length];
        inverse.AsSpan().Fill(-1);
        for (int start = 0; start < order.Length; start += length)
        {
            for (int i = 0; i < length; i++)
            {
                int p = order[start + i];
                if ((uint)p >= (uint)length || inverse[start + p] >= 0)
                {
                    throw new ArgumentException($"{name}[{start + i}] = {p}: each order of {length} positions must be a permutation of 0..{length - 1}", name);
                }
                inverse[start + p] = i;
            }
        }
        return inverse;
    }
}
