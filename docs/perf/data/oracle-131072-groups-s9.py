import numpy as np
d='/tmp/g131'   # attend gen --shape 1,131072,4,128 --output /tmp/g131 (default mix, seed 1)
q=np.load(d+'/q.npy', mmap_mode='r'); k=np.load(d+'/k.npy', mmap_mode='r')
S=q.shape[1]; D=q.shape[3]; B=128
rng=np.random.default_rng(0)
fs=[0.035,0.05,0.07]
nb=S//B
probs=np.arange(1,nb+1,dtype=float); probs/=probs.sum()
blocks=rng.choice(nb, size=6, replace=False, p=probs)
res={g:{f:[] for f in fs} for g in [16,32,64]}
for h in range(q.shape[2]):
  K=np.asarray(k[0,:,h,:],dtype=np.float64)
  for b in blocks:
    r0=b*B; n=r0+B
    Q=np.asarray(q[0,r0:r0+B,h,:],dtype=np.float64)
    s=(Q@K[:n].T)/np.sqrt(D)
    pos=np.arange(r0,r0+B)[:,None]; s[np.arange(n)[None,:]>pos]=-np.inf
    s-=s.max(1,keepdims=True); p=np.exp(s); p/=p.sum(1,keepdims=True)
    for g in res:
      for f in fs:
        kk=max(1,int(f*n)); acc=[]
        for a in range(0,B,g):
          col=p[a:a+g].sum(0); idx=np.argpartition(-col,kk-1)[:kk]
          acc.append(p[a:a+g][:,idx].sum(1).mean())
        res[g][f].append(np.mean(acc))
print('col sets by query-group rows',{g:{f:round(float(np.mean(v)),3) for f,v in res[g].items()} for g in res})
