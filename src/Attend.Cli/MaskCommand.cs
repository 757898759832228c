using System.CommandLine;
using System.Text.Json.Nodes;
using Attend.Masks;

namespace Attend.Cli;

/// <summary><c>attend mask show</c>: the block plan of a mask expression as an ASCII picture with its sparsity.</summary>
internal static class MaskCommand
{
    public static Command Create()
    {
        var expression = new Option<string>("--mask") { Description = "mask expression, e.g. \"causal & window(1024) | sink(64)\"", Required = true };
        var seq = new Option<int>("--seq") { Description = "query length Sq", Required = true };
        var kvSeq = new Option<int>("--kv-seq") { Description = "key length Skv (default Sq)" };
        var heads = new Option<int>("--heads") { Description = "heads", DefaultValueFactory = _ => 1 };
        var block = new Option<int>("--block") { Description = "block size (query and key)", DefaultValueFactory = _ => 128 };
        var json = new Option<string?>("--json") { Description = "write a JSON summary to this file ('-' for stdout)" };
        var show = new Command("show", "print the block plan of a mask: '#' full, '+' partial, '.' skipped");
        foreach (Option o in new Option[] { expression, seq, kvSeq, heads, block, json }) show.Options.Add(o);
        show.SetAction(r =>
        {
            Mask mask = MaskExpression.Parse(r.GetValue(expression)!);
            int sq = r.GetValue(seq), skv = r.GetValue(kvSeq) is > 0 and var k ? k : sq;
            var sw = System.Diagnostics.Stopwatch.StartNew();
            BlockMask plan = BlockMask.Create(mask, 1, r.GetValue(heads), sq, skv, r.GetValue(block), r.GetValue(block));
            double ms = sw.Elapsed.TotalMilliseconds;
            string? path = r.GetValue(json);
            if (path != "-")
            {
                Console.Write(plan.ToString());
                Console.WriteLine($"mask {mask}: {plan.VisitedBlocks} blocks visited, sparsity {plan.Sparsity:P2}, built in {ms:F1} ms");
            }
            JsonOutput.Write(path, new JsonObject
            {
                ["command"] = "mask show", ["mask"] = mask.ToString(), ["seqLen"] = sq, ["kvSeqLen"] = skv,
                ["block"] = r.GetValue(block), ["visitedBlocks"] = plan.VisitedBlocks, ["sparsity"] = plan.Sparsity, ["buildMs"] = ms,
            });
            return 0;
        });
        var command = new Command("mask", "inspect masks");
        command.Subcommands.Add(show);
        return command;
    }
}
