import numpy as np, sys
d='/tmp/g131'   # attend gen --shape 1,131072,4,128 --output /tmp/g131 (default mix, seed 1)
q=np.load(d+'/q.npy', mmap_mode='r'); k=np.load(d+'/k.npy', mmap_mode='r')
S=q.shape[1]; D=q.shape[3]; B=128
rng=np.random.default_rng(0)
fs=[0.02,0.035,0.05,0.07,0.1]
# query blocks weighted like causal work (row i has i keys): sample block index with prob ∝ index
nb=S//B
probs=np.arange(1,nb+1,dtype=float); probs/=probs.sum()
blocks=rng.choice(nb, size=12, replace=False, p=probs)
res={m:{f:[] for f in fs} for m in ['row','col','blk']}
for h in range(q.shape[2]):
  K=np.asarray(k[0,:,h,:],dtype=np.float64)
  for b in blocks:
    r0=b*B; n=r0+B
    Q=np.asarray(q[0,r0:r0+B,h,:],dtype=np.float64)
    s=(Q@K[:n].T)/np.sqrt(D)
    pos=np.arange(r0,r0+B)[:,None]; s[np.arange(n)[None,:]>pos]=-np.inf
    s-=s.max(1,keepdims=True); p=np.exp(s); p/=p.sum(1,keepdims=True)
    for f in fs:
      kk=max(1,int(f*n))   # keys per row / per block: f of the block's visible keys
      # row oracle
      srt=-np.sort(-p,axis=1)
      res['row'][f].append(srt[:,:kk].sum(1).mean())
      # column oracle: shared key set for the block
      col=p.sum(0); idx=np.argpartition(-col,kk-1)[:kk]
      res['col'][f].append(p[:,idx].sum(1).mean())
      # block oracle: 128-key blocks by total mass, kk/128 blocks
      nbk=(n+B-1)//B; pb=np.add.reduceat(p,np.arange(0,n,B),axis=1)
      kb=max(1,kk//B); idx=np.argpartition(-pb.sum(0),kb-1)[:kb]
      res['blk'][f].append(pb[:,idx].sum(1).mean())
  print('head',h,{m:{f:round(float(np.mean(v[-len(blocks):])),3) for f,v in res[m].items()} for m in res},flush=True)
print('ALL',{m:{f:round(float(np.mean(v)),3) for f,v in res[m].items()} for m in res})
