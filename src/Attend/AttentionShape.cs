using Attend.Tensors;

namespace Attend;

/// <summary>
/// The sizes of one attention problem, read from q [B, Sq, H, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, Dv] and
/// checked: every size ≥ 1, <c>H % Hkv == 0</c> (MHA, GQA, MQA).
/// </summary>
public readonly record struct AttentionShape(int Batch, int QueryLength, int KeyLength, int Heads, int KvHeads, int HeadDim, int ValueDim)
{
    /// <summary>Query heads per key/value head.</summary>
    public int GroupSize => Heads / KvHeads;

    /// <summary>Dense forward FLOPs, 2·B·H·Sq·Skv·(D + Dv) (= 4·B·H·Sq·Skv·D for D = Dv).</summary>
    public double DenseFlops => 2.0 * Batch * Heads * QueryLength * KeyLength * (HeadDim + ValueDim);

    /// <summary>FLOPs of the pairs a causal mask keeps (bottom-right aligned).</summary>
    public double CausalFlops
    {
        get
        {
            double pairs = 0;
            long offset = (long)KeyLength - QueryLength;
            // Row i sees min(Skv, max(0, i + offset + 1)) keys.
            for (long i = 0; i < QueryLength; i++)
            {
                pairs += Math.Clamp(i + offset + 1, 0, KeyLength);
            }
            return 2.0 * Batch * Heads * pairs * (HeadDim + ValueDim);
        }
    }

    /// <summary>Reads and checks the shapes of q, k and v.</summary>
    /// <exception cref="ArgumentException">naming the argument, the expected and the actual shape.</exception>
    public static AttentionShape Of<T>(in TensorView<T> q, in TensorView<T> k, in TensorView<T> v) where T : unmanaged
    {
        RequireRank4(q, nameof(q), "[B, Sq, H, D]");
        RequireRank4(k, nameof(k), "[B, Skv, Hkv, D]");
        RequireRank4(v, nameof(v), "[B, Skv, Hkv, Dv]");
        return Of(q.Shape, k.Shape, v.Shape);
    }

    /// <summary>Checks rank-4 shapes of q, k and v (any backend's tensors).</summary>
    /// <exception cref="ArgumentException">naming the argument, the expected and the actual shape.</exception>
    public static AttentionShape Of(ReadOnlySpan<int> q, ReadOnlySpan<int> k, ReadOnlySpan<int> v)
    {
        if (q.Length != 4) throw new ArgumentException($"q must have shape [B, Sq, H, D]; got {Format(q)}", nameof(q));
        if (k.Length != 4) throw new ArgumentException($"k must have shape [B, Skv, Hkv, D]; got {Format(k)}", nameof(k));
        if (v.Length != 4) throw new ArgumentException($"v must have shape [B, Skv, Hkv, Dv]; got {Format(v)}", nameof(v));
        int b = q[0], sq = q[1], h = q[2], d = q[3];
        int skv = k[1], hkv = k[2], dv = v[3];
        if (b == 0 || sq == 0 || h == 0 || d == 0)
        {
            throw new ArgumentException($"q must have non-zero sizes [B, Sq, H, D]; got {Format(q)}", nameof(q));
        }
        if (k[0] != b || k[3] != d || skv == 0 || hkv == 0)
        {
            throw new ArgumentException($"k must have shape [B={b}, Skv≥1, Hkv≥1, D={d}]; got {Format(k)}", nameof(k));
        }
        if (h % hkv != 0)
        {
            throw new ArgumentException($"the query heads H={h} must be a multiple of the key/value heads Hkv={hkv} (k is {Format(k)})", nameof(k));
        }
        if (v[0] != b || v[1] != skv || v[2] != hkv || dv == 0)
        {
            throw new ArgumentException($"v must have shape [B={b}, Skv={skv}, Hkv={hkv}, Dv≥1]; got {Format(v)}", nameof(v));
        }
        return new AttentionShape(b, sq, skv, h, hkv, d, dv);
    }

    private static string Format(ReadOnlySpan<int> shape) => TensorView<float>.FormatShape(shape);

    /// <summary>Checks that <paramref name="output"/> is [B, Sq, H, Dv].</summary>
    public void RequireOutput<T>(in TensorView<T> output, string name) where T : unmanaged
    {
        RequireRank4(output, name, $"[B={Batch}, Sq={QueryLength}, H={Heads}, Dv={ValueDim}]");
        RequireOutput(output.Shape, name);
    }

    /// <summary>Checks that an output shape is [B, Sq, H, Dv].</summary>
    public void RequireOutput(ReadOnlySpan<int> output, string name)
    {
        if (output.Length != 4 || output[0] != Batch || output[1] != QueryLength || output[2] != Heads || output[3] != ValueDim)
        {
            throw new ArgumentException($"{name} must have shape [B={Batch}, Sq={QueryLength}, H={Heads}, Dv={ValueDim}]; got {Format(output)}", name);
        }
    }

    /// <summary>Checks that <paramref name="lse"/> is [B, Sq, H] (heads-last, like the output).</summary>
    public void RequireLse(in TensorView<float> lse, string name) => RequireLse(lse.Shape, name);

    /// <summary>Checks that an LSE shape is [B, Sq, H].</summary>
    public void RequireLse(ReadOnlySpan<int> lse, string name)
    {
        if (lse.Length != 3 || lse[0] != Batch || lse[1] != QueryLength || lse[2] != Heads)
        {
            throw new ArgumentException($"{name} must have shape [B={Batch}, Sq={QueryLength}, H={Heads}]; got {Format(lse)}", name);
        }
    }

    /// <summary>Checks the options against this shape and returns the effective scale.</summary>
    public float Validate(AttentionOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        float scale = options.Scale ?? 1f / MathF.Sqrt(HeadDim);
        if (!float.IsFinite(scale) || scale < 0)
        {
            throw new ArgumentException($"Scale must be finite and non-negative; got {scale}", nameof(options));
        }
        if (!float.IsFinite(options.Softcap) || options.Softcap < 0)
        {
            throw new ArgumentException($"Softcap must be finite and non-negative (0 disables it); got {options.Softcap}", nameof(options));
        }
        if (options.AlibiSlopes is { } slopes)
        {
            if (slopes.Count != Heads && slopes.Count != Batch * Heads)
            {
                throw new ArgumentException($"AlibiSlopes must have H={Heads} or B·H={Batch * Heads} entries; got {slopes.Count}", nameof(options));
            }
            if (slopes.Any(s => !float.IsFinite(s)))
            {
                throw new ArgumentException("AlibiSlopes must be finite", nameof(options));
            }
        }
        if (options.Plan is { } plan)
        {
            if (options.Causal || options.Mask is not null || options.Predicate is not null)
            {
                throw new ArgumentException("Plan is the whole specification of the computed pairs: leave Causal, Mask and Predicate unset (build them into the plan)", nameof(options));
            }
            if (plan.Extent != new Masks.MaskExtent(Batch, Heads, QueryLength, KeyLength))
            {
                throw new ArgumentException($"Plan was built for B={plan.Extent.Batch}, H={plan.Extent.Heads}, Sq={plan.Extent.QueryLength}, Skv={plan.Extent.KeyLength}; the inputs are B={Batch}, H={Heads}, Sq={QueryLength}, Skv={KeyLength}", nameof(options));
            }
            if (plan.Compensation != Masks.Compensation.None && (options.Softcap != 0 || options.AlibiSlopes is not null || !options.Bias.IsDefault))
            {
                throw new ArgumentException("centroid compensation does not model Softcap, ALiBi or a bias; leave them unset", nameof(options));
            }
            if (plan.Permutation is { } permutation)
            {
                if (permutation.KvHeads != KvHeads)
                {
                    throw new ArgumentException($"Plan's permutation orders keys of Hkv={permutation.KvHeads} heads; the inputs have Hkv={KvHeads}", nameof(options));
                }
                if (options.AlibiSlopes is not null || !options.Bias.IsDefault)
                {
                    // Both are functions of positions; the permuted executor would see permuted ones.
                    throw new ArgumentException("a Plan with a token permutation cannot be combined with AlibiSlopes or Bias", nameof(options));
                }
            }
        }
        TensorView<float> bias = options.Bias;
        if (!bias.IsDefault && (bias.Rank != 4 || bias.Dim(0) != Batch || bias.Dim(1) != Heads || bias.Dim(2) != QueryLength || bias.Dim(3) != KeyLength))
        {
            throw new ArgumentException($"Bias must have shape [B={Batch}, H={Heads}, Sq={QueryLength}, Skv={KeyLength}]; got {bias.ShapeString()}", nameof(options));
        }
        return scale;
    }

    /// <summary>The extent masks are evaluated against.</summary>
    public Masks.MaskExtent MaskExtent => new(Batch, Heads, QueryLength, KeyLength);

    /// <summary>Whether options' Causal, Predicate, Mask and Plan allow (q, kv) — the reference semantics.</summary>
    internal bool Allows(AttentionOptions options, int b, int h, int q, int kv) =>
        (!options.Causal || kv <= q + ((long)KeyLength - QueryLength))
        && (options.Predicate?.Invoke(b, h, q, kv) ?? true)
        && (options.Mask?.Allows(MaskExtent, b, h, q, kv) ?? true)
        && (options.Plan?.Allows(b, h, q, kv) ?? true);

    /// <summary>ALiBi slope of (batch, head), or 0 without ALiBi.</summary>
    internal float AlibiSlope(AttentionOptions options, int batch, int head) =>
        options.AlibiSlopes is not { } s ? 0f : s.Count == Heads ? s[head] : s[(batch * Heads) + head];

    private static void RequireRank4<T>(in TensorView<T> t, string name, string expected) where T : unmanaged
    {
        if (t.IsDefault)
        {
            throw new ArgumentException($"{name} must be a tensor of shape {expected}; got none", name);
        }
        if (t.Rank != 4)
        {
            throw new ArgumentException($"{name} must have shape {expected}; got rank {t.Rank} {t.ShapeString()}", name);
        }
    }
}
