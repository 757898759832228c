# Session 9: the share of each row's softmax mass inside the best key set of a given size, at several granularities
# (docs/perf/cuda-sparse.md, "The 131072 bar: what finer-grained oracles keep"). Inputs:
#   attend gen --shape 1,131072,4,128 --output /tmp/g131      (the generator's default mix, seed 1)
# Run: /usr/bin/python3 oracle-131072-s9.py [groups]   (≈ 4 min for the first table; "groups" ≈ 30 s for the second)
import sys
import numpy as np

d = '/tmp/g131'
q = np.load(d + '/q.npy', mmap_mode='r')
k = np.load(d + '/k.npy', mmap_mode='r')
S, D, B = q.shape[1], q.shape[3], 128
groups_only = len(sys.argv) > 1 and sys.argv[1] == 'groups'
rng = np.random.default_rng(0)
nb = S // B
probs = np.arange(1, nb + 1, dtype=float)   # query blocks drawn ∝ their causal work
probs /= probs.sum()
blocks = rng.choice(nb, size=6 if groups_only else 12, replace=False, p=probs)
fs = [0.035, 0.05, 0.07] if groups_only else [0.02, 0.035, 0.05, 0.07, 0.1]
methods = ['16', '32', '64'] if groups_only else ['row', 'col', 'blk']
res = {m: {f: [] for f in fs} for m in methods}


def column_share(p, rows, kk):
    """Mean share kept when each group of `rows` query rows shares its kk keys of largest total mass."""
    acc = []
    for a in range(0, p.shape[0], rows):
        col = p[a:a + rows].sum(0)
        idx = np.argpartition(-col, kk - 1)[:kk]
        acc.append(p[a:a + rows][:, idx].sum(1).mean())
    return np.mean(acc)


for h in range(q.shape[2]):
    K = np.asarray(k[0, :, h, :], dtype=np.float64)
    for b in blocks:
        r0 = b * B
        n = r0 + B
        Q = np.asarray(q[0, r0:r0 + B, h, :], dtype=np.float64)
        s = (Q @ K[:n].T) / np.sqrt(D)
        pos = np.arange(r0, r0 + B)[:, None]
        s[np.arange(n)[None, :] > pos] = -np.inf
        s -= s.max(1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(1, keepdims=True)
        for f in fs:
            kk = max(1, int(f * n))   # keys per row (or per group): f of the block's visible keys
            if groups_only:
                for g in methods:
                    res[g][f].append(column_share(p, int(g), kk))
                continue
            res['row'][f].append((-np.sort(-p, axis=1))[:, :kk].sum(1).mean())   # each row its own keys
            res['col'][f].append(column_share(p, B, kk))                        # one key set per 128 rows
            pb = np.add.reduceat(p, np.arange(0, n, B), axis=1)                 # 128-key blocks
            kb = max(1, kk // B)
            idx = np.argpartition(-pb.sum(0), kb - 1)[:kb]
            res['blk'][f].append(pb[:, idx].sum(1).mean())
    per_head = {m: {f: round(float(np.mean(v[-len(blocks):])), 3) for f, v in res[m].items()} for m in res}
    print('head', h, per_head, flush=True)
print('ALL', {m: {f: round(float(np.mean(v)), 3) for f, v in res[m].items()} for m in res})
