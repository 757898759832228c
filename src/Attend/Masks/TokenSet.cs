namespace Attend.Masks;

/// <summary>
/// A plan finer than blocks: for each (batch, head, query block) a sorted list of key token indices that every
/// query of the block attends (vertical stripes, top-k tokens, retrieved tokens). An optional element mask (e.g.
/// <see cref="Mask.Causal"/>) still applies to the gathered pairs. Stored as CSR; broadcast over batch/heads when
/// built with one row set.
/// </summary>
public sealed class TokenSet : BlockRows
{
    private readonly int[] _tokens;

    private TokenSet(MaskExtent extent, int blockQ, int planBatch, int planHeads, int[] rowStart, int[] tokens, Mask? mask)
        : base(extent, blockQ, planBatch, planHeads, rowStart)
    {
        _tokens = tokens;
        Mask = mask;
    }

    /// <summary>Element mask applied to gathered pairs; null: none.</summary>
    public Mask? Mask { get; }

    /// <summary>Total listed tokens over all stored rows.</summary>
    public int Count => _tokens.Length;

    /// <summary>
    /// Builds a token set: <paramref name="tokens"/> gives the key indices of (batch, head, query block); they are
    /// sorted and de-duplicated. With <paramref name="broadcast"/> the function is asked once, for (0, 0, qb).
    /// </summary>
    public static TokenSet Create(int batch, int heads, int queryLength, int keyLength, int blockQ,
        Func<int, int, int, IEnumerable<int>> tokens, Mask? mask = null, bool broadcast = false)
    {
        ArgumentNullException.ThrowIfNull(tokens);
        if (batch < 1 || heads < 1 || queryLength < 1 || keyLength < 1 || blockQ < 1)
        {
            throw new ArgumentException($"TokenSet needs B, H, Sq, Skv, blockQ ≥ 1; got B={batch}, H={heads}, Sq={queryLength}, Skv={keyLength}, blockQ={blockQ}");
        }
        var extent = new MaskExtent(batch, heads, queryLength, keyLength);
        int pb = broadcast ? 1 : batch, ph = broadcast ? 1 : heads;
        int queryBlocks = (queryLength + blockQ - 1) / blockQ;
        var all = new List<int>();
        int[] rowStart = BuildRows(pb, ph, queryBlocks, all, (b, h, qb, list) =>
        {
            IEnumerable<int> row = tokens(b, h, qb);
            // Rows given ascending and distinct (the selectors sort theirs per head, in parallel) are taken as they are:
            // hashing and sorting ≈ 4M tokens here took ≈ 150 ms of DHSA's plan at S = 32768 (session 10).
            if (row is not List<int> sorted || !StrictlyAscending(sorted)) sorted = [.. row.Distinct().Order()];
            foreach (int t in sorted)
            {
                if (t < 0 || t >= keyLength) throw new ArgumentException($"token {t} of (b={b}, h={h}, query block {qb}) is outside 0..{keyLength - 1}", nameof(tokens));
            }
            list.AddRange(sorted);
        });
        return new TokenSet(extent, blockQ, pb, ph, rowStart, [.. all], mask);
    }

    private static bool StrictlyAscending(List<int> row)
    {
        for (int i = 1; i < row.Count; i++)
            if (row[i] <= row[i - 1]) return false;
        return true;
    }

    /// <summary>The sorted key tokens of (batch, head, query block).</summary>
    public ReadOnlySpan<int> Row(int batch, int head, int queryBlock)
    {
        (int start, int end) = RowRange(batch, head, queryBlock);
        return _tokens.AsSpan(start, end - start);
    }

    /// <summary>Whether query q's block lists key kv and the element mask allows the pair.</summary>
    public bool Allows(int batch, int head, int q, int kv) =>
        Row(batch, head, q / BlockQ).BinarySearch(kv) >= 0 && (Mask?.Allows(Extent, batch, head, q, kv) ?? true);
}

/// <summary>What a plan does about the key blocks it skips.</summary>
public enum Compensation
{
    /// <summary>Skipped blocks contribute nothing (the plan's pairs only).</summary>
    None,

    /// <summary>
    /// Each skipped block a row may wholly see joins as one centroid, merged in LSE space
    /// (<see cref="Sparse.CentroidCompensation"/>).
    /// </summary>
    Centroid,
}

/// <summary>
/// What the executor runs: a <see cref="BlockMask"/> and/or a <see cref="TokenSet"/> over the same extent and
/// query blocks. A pair is computed when the block plan computes it, or when its key is listed in the token set
/// and its key block is not visited by the block plan (tokens inside visited blocks belong to those blocks).
/// </summary>
public sealed class SparsityPlan
{
    /// <summary>
    /// A plan of blocks, tokens or both; with <paramref name="permutation"/> they are expressed over the permuted
    /// token order (see <see cref="TokenPermutation"/>); <paramref name="compensation"/> says what the executor adds
    /// for the skipped blocks (needs blocks and no permutation).
    /// </summary>
    public SparsityPlan(BlockMask? blocks, TokenSet? tokens = null, TokenPermutation? permutation = null, Compensation compensation = Compensation.None)
    {
        if (blocks is null && tokens is null) throw new ArgumentException("a plan needs blocks, tokens or both");
        if (blocks is not null && tokens is not null && (blocks.Extent != tokens.Extent || blocks.BlockQ != tokens.BlockQ))
        {
            throw new ArgumentException($"blocks and tokens must share extent and BlockQ; got {blocks.Extent}/{blocks.BlockQ} and {tokens.Extent}/{tokens.BlockQ}", nameof(tokens));
        }
        Blocks = blocks;
        Tokens = tokens;
        if (permutation is not null)
        {
            MaskExtent e = Extent;
            if (permutation.Batch != e.Batch || permutation.Heads != e.Heads || permutation.QueryLength != e.QueryLength || permutation.KeyLength != e.KeyLength)
            {
                throw new ArgumentException($"permutation is for B={permutation.Batch}, H={permutation.Heads}, Sq={permutation.QueryLength}, Skv={permutation.KeyLength}; the plan for {e}", nameof(permutation));
            }
        }
        Permutation = permutation;
        if (compensation != Compensation.None && (blocks is null || permutation is not null || !Enum.IsDefined(compensation)))
        {
            throw new ArgumentException($"compensation {compensation} needs a plan with blocks and no permutation", nameof(compensation));
        }
        Compensation = compensation;
    }

    /// <summary>What the executor adds for the skipped blocks.</summary>
    public Compensation Compensation { get; }

    /// <summary>The same plan with another <see cref="Compensation"/>.</summary>
    public SparsityPlan WithCompensation(Compensation compensation) => new(Blocks, Tokens, Permutation, compensation);

    /// <summary>The token order the blocks and tokens are expressed in; null: the original order.</summary>
    public TokenPermutation? Permutation { get; }

    /// <summary>The block plan, if any.</summary>
    public BlockMask? Blocks { get; }

    /// <summary>The token plan, if any.</summary>
    public TokenSet? Tokens { get; }

    /// <summary>B, H, Sq, Skv.</summary>
    public MaskExtent Extent => Blocks?.Extent ?? Tokens!.Extent;

    /// <summary>Query rows per block.</summary>
    public int BlockQ => Blocks?.BlockQ ?? Tokens!.BlockQ;

    /// <summary>A plan of blocks only.</summary>
    public static implicit operator SparsityPlan(BlockMask blocks) => new(blocks);

    /// <summary>A plan of tokens only.</summary>
    public static implicit operator SparsityPlan(TokenSet tokens) => new(null, tokens);

    /// <summary>Same as the implicit conversion.</summary>
    public static SparsityPlan FromBlockMask(BlockMask blocks) => new(blocks);

    /// <summary>Whether the plan computes (q, kv), in original positions.</summary>
    public bool Allows(int batch, int head, int q, int kv)
    {
        if (Permutation is { } p)
        {
            q = p.PermutedQuery(batch, head, q);
            kv = p.PermutedKey(batch, head, kv);
        }
        if (Blocks is not null)
        {
            if (Blocks.Allows(batch, head, q, kv)) return true;
            if (Blocks.Row(batch, head, q / Blocks.BlockQ, out _).BinarySearch(kv / Blocks.BlockK) >= 0) return false;
        }
        return Tokens?.Allows(batch, head, q, kv) ?? false;
    }
}
