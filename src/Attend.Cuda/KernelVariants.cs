namespace Attend.Cuda;

/// <summary>Tile configuration of the fused forward kernel for one padded head dim.</summary>
/// <param name="HeadDim">Padded head dim compiled into the kernel (multiple of 64).</param>
/// <param name="BlockM">Query rows per thread block.</param>
/// <param name="BlockN">Keys per pipeline stage.</param>
/// <param name="Warps">Warps per block (each owns BlockM / Warps rows).</param>
internal readonly record struct FlashConfig(int HeadDim, int BlockM, int BlockN, int Warps)
{
    /// <summary>The configuration for a real head dim (1–256).</summary>
    public static FlashConfig For(int headDim)
    {
        int padded = (headDim + 63) / 64 * 64;
        // Tuning experiments: ATTEND_CUDA_FLASH="BLOCK_M,BLOCK_N,WARPS" overrides the table below for every D.
        if (Environment.GetEnvironmentVariable("ATTEND_CUDA_FLASH") is { Length: > 0 } forced)
        {
            int[] v = forced.Split(',').Select(x => int.Parse(x, System.Globalization.CultureInfo.InvariantCulture)).ToArray();
            return new FlashConfig(padded, v[0], v[1], v[2]);
        }
        // D ≤ 128: 128×64 tiles, 4 warps of 32 rows (two m16 tiles share every K/V fragment: half the ldmatrix
        // traffic of 8 warps × 16 rows, measured 1.38× faster on the H100 at S=4096, D=128: 1.10 vs 1.52 ms), 255
        // registers without spills, 96 KiB of shared memory. Larger D: 64-row blocks and 32-key stages.
        return padded <= 128 ? new FlashConfig(padded, 128, 64, 4) : new FlashConfig(padded, 64, 32, 4);
    }

    /// <summary>
    /// How much of the kernel runs on Hopper's warpgroup MMA (<c>USE_WGMMA</c>): 0 none, 1 S = Q·Kᵀ, 2 both products.
    /// On sm_90a for the 4-warp 128×64 configuration (D ≤ 128): 2; <c>ATTEND_CUDA_WGMMA=0|1|2</c> overrides it (to
    /// measure the steps against each other in one device call).
    /// </summary>
    public int WgmmaLevel(string architecture)
    {
        if (!SupportsWgmma(architecture)) return 0;
        if (ForcedWgmmaLevel.Value is { } forced) return forced;
        return Environment.GetEnvironmentVariable("ATTEND_CUDA_WGMMA") switch { "0" => 0, "1" => 1, _ => 2 };
    }

    /// <summary>Whether this configuration has wgmma variants on <paramref name="architecture"/>.</summary>
    public bool SupportsWgmma(string architecture) => architecture == "sm_90a" && Warps == 4 && BlockM == 128 && BlockN == 64;

    /// <summary>Tests pin the level for the calls of one flow (each level is checked against the reference).</summary>
    internal static readonly AsyncLocal<int?> ForcedWgmmaLevel = new();

    /// <summary>Dynamic shared memory: Q tile plus two stages of K and V tiles (2-byte elements), then two stages of
    /// gathered key indices (4-byte, used by token plans).</summary>
    public int SharedBytes => ((BlockM + 4 * BlockN) * HeadDim * 2) + (2 * BlockN * 4);

    public Dictionary<string, string> Defines(bool bf16, bool causal, bool softcap, int wgmma = 0) => new()
    {
        ["USE_WGMMA"] = wgmma.ToString(System.Globalization.CultureInfo.InvariantCulture),
        ["HEAD_DIM"] = HeadDim.ToString(System.Globalization.CultureInfo.InvariantCulture),
        ["BLOCK_M"] = BlockM.ToString(System.Globalization.CultureInfo.InvariantCulture),
        ["BLOCK_N"] = BlockN.ToString(System.Globalization.CultureInfo.InvariantCulture),
        ["WARPS"] = Warps.ToString(System.Globalization.CultureInfo.InvariantCulture),
        ["IS_BF16"] = bf16 ? "1" : "0",
        ["IS_CAUSAL"] = causal ? "1" : "0",
        ["HAS_SOFTCAP"] = softcap ? "1" : "0",
    };
}

/// <summary>Every (kernel source, defines) combination the backend can compile: the CI compile check walks this list.</summary>
public static class KernelVariants
{
    /// <summary>All variants.</summary>
    public static IEnumerable<(string Source, IReadOnlyDictionary<string, string> Defines)> All()
    {
        foreach (int d in new[] { 64, 128, 192, 256 })
            foreach (bool bf16 in new[] { true, false })
                foreach (bool causal in new[] { false, true })
                    foreach (bool softcap in new[] { false, true })
                        foreach (int wgmma in FlashConfig.For(d).SupportsWgmma("sm_90a") ? new[] { 0, 1, 2 } : [0])
                            yield return ("flash_fwd.cu", FlashConfig.For(d).Defines(bf16, causal, softcap, wgmma));
        // Block-sparse plans: the causal expression (what selectors' plans and causal masks use) per head dim and dtype.
        string causalExpression = Masks.Mask.Causal.ToCuda(new Masks.MaskExtent(1, 1, 4096, 4096));
        foreach (int d in new[] { 64, 128, 256 })
            foreach (bool bf16 in new[] { true, false })
            {
                foreach (int wgmma in FlashConfig.For(d).SupportsWgmma("sm_90a") ? new[] { 0, 1, 2 } : [0])
                {
                    Dictionary<string, string> defines = FlashConfig.For(d).Defines(bf16, false, false, wgmma);
                    defines["HAS_PLAN"] = "1";
                    defines["MASK_EXPR"] = causalExpression;
                    yield return ("flash_fwd.cu", defines);
                }
            }
        // Gathered tokens (TokenSet plans): with and without a block plan's causal partial blocks, tokens masked causally.
        foreach (int d in new[] { 64, 128, 256 })
            foreach (int wgmma in FlashConfig.For(d).SupportsWgmma("sm_90a") ? new[] { 0, 2 } : [0])
            {
                Dictionary<string, string> defines = FlashConfig.For(d).Defines(true, false, false, wgmma);
                defines["HAS_PLAN"] = "1";
                defines["MASK_EXPR"] = causalExpression;
                defines["HAS_TOKENS"] = "1";
                defines["TOKEN_MASK_EXPR"] = causalExpression;
                yield return ("flash_fwd.cu", defines);
                // The centroid pass of compensated plans: gathered centroids only, no element mask.
                Dictionary<string, string> centroids = FlashConfig.For(d).Defines(true, false, false, wgmma);
                centroids["HAS_PLAN"] = "1";
                centroids["MASK_EXPR"] = "true";
                centroids["HAS_TOKENS"] = "1";
                centroids["TOKEN_MASK_EXPR"] = "true";
                yield return ("flash_fwd.cu", centroids);
            }
        // Permuted bucket plans: the mask expression reads the bucket ids and positions from p.mask_data.
        foreach (bool causal in new[] { false, true })
        {
            Masks.Mask bucketMask = Sparse.BucketPlan.Create(1, 2, 1, 300, 300, new int[600], new int[300], causal, 128).Blocks!.Mask!;
            Dictionary<string, string> defines = FlashConfig.For(128).Defines(true, false, false, FlashConfig.For(128).SupportsWgmma("sm_90a") ? 2 : 0);
            defines["HAS_PLAN"] = "1";
            defines["MASK_EXPR"] = bucketMask.ToCuda(new Masks.MaskExtent(1, 2, 300, 300));
            yield return ("flash_fwd.cu", defines);
        }
        // Linear attention: each feature map with F = D, both head-dim tiles.
        for (int map = 0; map < 3; map++)
            foreach (int dMax in new[] { 64, 128 })
                yield return ("linear.cu", new Dictionary<string, string>
                {
                    ["MAP"] = map.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    ["D_MAX"] = dMax.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    ["CHUNK"] = "32",
                });
        // GPU selectors: pooled block selection per input type.
        for (int src = 0; src < 3; src++)
            yield return ("select.cu", new Dictionary<string, string> { ["SRC_T"] = src.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        // XAttention's antidiagonal estimate and SALE's low-bit estimate per input type and groups per block (block / stride).
        for (int src = 0; src < 3; src++)
            foreach (int groupCols in new[] { 8, 16, 32, 64 })
                yield return ("estimate.cu", new Dictionary<string, string>
                {
                    ["SRC_T"] = src.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    ["GROUP_COLS"] = groupCols.ToString(System.Globalization.CultureInfo.InvariantCulture),
                });
        yield return ("estimate.cu", new Dictionary<string, string> { ["SRC_T"] = "2", ["INT8_OPS"] = "1" });   // SALE's scaled_block_max on s8 mma
        for (int src = 0; src < 3; src++)
            for (int dst = 0; dst < 3; dst++)
                yield return ("convert.cu", new Dictionary<string, string> { ["SRC_T"] = src.ToString(System.Globalization.CultureInfo.InvariantCulture), ["DST_T"] = dst.ToString(System.Globalization.CultureInfo.InvariantCulture) });
    }
}
