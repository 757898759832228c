using Attend.Tensors;

namespace Attend.Cli;

/// <summary>Command-line tensor arguments: <c>file.npy</c> or <c>file.safetensors:name</c>.</summary>
internal static class TensorFiles
{
    /// <summary>An attention operand: [B, S, H, D], or [S, H, D] as batch 1.</summary>
    public static Tensor Load(string spec, string argument)
    {
        Tensor t = LoadAny(spec, argument);
        if (t.Shape.Count == 3)
        {
            t = Reshape(t, [1, .. t.Shape]);  // [S, H, D] means batch 1
        }
        if (t.Shape.Count != 4)
        {
            throw new ArgumentException($"--{argument}: expected a tensor of shape [B, S, H, D] (or [S, H, D]); got {t}");
        }
        return t;
    }

    /// <summary>A tensor of any shape; float64 read as float32.</summary>
    public static Tensor LoadAny(string spec, string argument)
    {
        int colon = spec.LastIndexOf(':');
        Tensor t;
        if (spec.EndsWith(".npy", StringComparison.OrdinalIgnoreCase))
        {
            t = Npy.Read(spec);
        }
        else if (colon > 0 && spec[..colon].EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            t = SafeTensors.Read(spec[..colon], spec[(colon + 1)..]);
        }
        else if (spec.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            var all = SafeTensors.ReadAll(spec);
            if (all.Count != 1)
            {
                throw new ArgumentException($"--{argument}: {spec} holds {all.Count} tensors; name one as FILE:NAME ({string.Join(", ", all.Keys)})");
            }
            t = all.Values.Single();
        }
        else
        {
            throw new ArgumentException($"--{argument}: expected FILE.npy or FILE.safetensors[:NAME]; got '{spec}'");
        }
        return t.DType == DType.Float64 ? t.ConvertTo(DType.Float32) : t;
    }

    private static Tensor Reshape(Tensor t, int[] shape) => t.Data switch
    {
        float[] f => Tensor.FromArray(f, shape),
        Half[] h => Tensor.FromArray(h, shape),
        BFloat16[] b => Tensor.FromArray(b, shape),
        double[] d => Tensor.FromArray(d, shape),
        _ => throw new InvalidDataException("unknown element type"),
    };

    public static void Save(string path, Tensor tensor)
    {
        if (path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            SafeTensors.Write(path, new Dictionary<string, Tensor> { ["out"] = tensor });
        }
        else
        {
            Npy.Write(path, tensor);
        }
    }
}
