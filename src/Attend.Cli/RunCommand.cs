using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary><c>attend run</c>: attention on tensors in files. External checks rely on this contract: keep it stable.</summary>
internal static class RunCommand
{
    public static Command Create()
    {
        var args = new AttentionArguments();
        var output = new Option<string>("--out") { Description = "output file (.npy, or .safetensors with tensor 'out'), input dtype", Required = true };
        var lse = new Option<string?>("--lse") { Description = "optional LSE output file [B,Sq,H] f32" };
        var command = new Command("run", "compute attention on .npy/.safetensors inputs and write the output");
        args.AddTo(command);
        command.Options.Add(output);
        command.Options.Add(lse);
        command.SetAction(r =>
        {
            (Tensor q, Tensor k, Tensor v) = args.LoadInputs(r);
            var sw = Stopwatch.StartNew();
            Tensor o;
            Tensor? l = null;
            if (args.LinearOptions(r) is { } linear)
            {
                o = args.DeviceName(r) == "cuda" ? AttentionArguments.ComputeLinearCuda(q, k, v, linear) : AttentionArguments.ComputeLinear(q, k, v, linear, args.Tuning(r));
            }
            else if (r.GetValue(args.Hybrid) is { } hybrid)
            {
                if (args.DeviceName(r) != "cpu") throw new NotSupportedException("--hybrid runs on the CPU for now");
                o = AttentionArguments.ComputeHybrid(q, k, v, hybrid, r.GetValue(args.Causal), args.Tuning(r));
            }
            else
            {
                (o, l) = AttentionArguments.Compute(q, k, v, args.Options(r), args.Tuning(r), args.DeviceName(r), args.ParseSelector(r));
            }
            double ms = sw.Elapsed.TotalMilliseconds;
            TensorFiles.Save(r.GetValue(output)!, o);
            if (r.GetValue(lse) is { } lsePath)
            {
                if (l is null) throw new ArgumentException("--lse is not defined for linear or hybrid attention");
                TensorFiles.Save(lsePath, l);
            }
            string? json = r.GetValue(args.Json);
            if (json != "-") Console.WriteLine($"attend run: {q} x {k} x {v} -> {o} in {ms:F1} ms");
            JsonOutput.Write(json, new JsonObject
            {
                ["command"] = "run",
                ["q"] = q.ToString(), ["k"] = k.ToString(), ["v"] = v.ToString(), ["out"] = o.ToString(),
                ["causal"] = r.GetValue(args.Causal),
                ["ms"] = ms,
            });
            return 0;
        });
        return command;
    }
}
