using Attend.Masks;
using Attend.Tensors;

namespace Attend;

/// <summary>Decides per element whether query <paramref name="query"/> may attend key <paramref name="key"/>.</summary>
/// <remarks>Evaluated for every (query, key) pair of the blocks it touches: O(Sq·Skv) calls. CPU only.</remarks>
public delegate bool MaskPredicate(int batch, int head, int query, int key);

/// <summary>
/// What attention computes (never how fast: that is <see cref="KernelTuning"/>). For query i and key j of head h:
/// <c>s = Scale · q·k</c>; with <see cref="Softcap"/> c &gt; 0, <c>s = c·tanh(s / c)</c>; then ALiBi
/// <c>s −= slope[h] · |i + Skv − Sq − j|</c> and <see cref="Bias"/> <c>s += bias[b, h, i, j]</c>; then pairs that
/// <see cref="Causal"/> or <see cref="Predicate"/> exclude are dropped; <c>o = Σ softmax(s)·v</c>.
/// A row with no allowed key gives output 0 and LSE −∞.
/// </summary>
public sealed record AttentionOptions
{
    /// <summary>Default options: non-causal, scale 1/√D, nothing else.</summary>
    public static AttentionOptions Default { get; } = new();

    /// <summary>
    /// Query i attends key j only when <c>j ≤ i + Skv − Sq</c>: causal aligned bottom-right, as FlashAttention ≥ 2.1
    /// (the last query sees every key; with Sq &gt; Skv the first Sq − Skv rows see nothing).
    /// </summary>
    public bool Causal { get; init; }

    /// <summary>Multiplier of q·k; null means 1/√D. Must be finite and non-negative.</summary>
    public float? Scale { get; init; }

    /// <summary>Tanh soft-capping of the scaled score (Gemma 2, Grok); 0 disables it. Must be finite and non-negative.</summary>
    public float Softcap { get; init; }

    /// <summary>
    /// ALiBi slopes (Press et al., arXiv:2108.12409), one per query head (length H) or per batch and head
    /// (length B·H, batch-major); the bias <c>−slope · |i + Skv − Sq − j|</c> is added, as in FlashAttention.
    /// </summary>
    public IReadOnlyList<float>? AlibiSlopes { get; init; }

    /// <summary>An additive score bias of shape [B, H, Sq, Skv] (use stride 0 to broadcast); default: none.
    /// −∞ entries exclude pairs. It is O(Sq·Skv) memory by nature: prefer masks and ALiBi.</summary>
    public TensorView<float> Bias { get; init; }

    /// <summary>An element mask evaluated on every pair of the blocks the plan visits; null: none.</summary>
    public MaskPredicate? Predicate { get; init; }

    /// <summary>
    /// Which pairs are computed, as a composable <see cref="Masks.Mask"/> (combined by AND with <see cref="Causal"/> and
    /// <see cref="Predicate"/>); the executor builds its block plan analytically and skips empty blocks.
    /// </summary>
    public Mask? Mask { get; init; }

    /// <summary>
    /// A prebuilt plan — a <see cref="BlockMask"/> (from <see cref="BlockMask.Create"/> or a sparse selector), a
    /// <see cref="TokenSet"/>, or both as a <see cref="SparsityPlan"/>. It is the whole
    /// specification of which pairs are computed: Causal, Mask and Predicate must then be unset. Its extent must match
    /// the inputs; on the CPU its BlockK must be a multiple of 64 and its BlockQ a multiple of 4 up to 256.
    /// </summary>
    public SparsityPlan? Plan { get; init; }
}
