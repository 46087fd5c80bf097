"""Where IVF-PQ loses top-1 agreement on the 1e6 x 512 synthetic map of `vpr-edge bench map`
(same data, seed and queries): probe misses (is the exact top-1 in a probed list?) vs PQ ranking
(rank of the exact top-1 in the PQ candidate list), then latency / agreement of IVF-PQ re-ranked
with an SQ8 copy (faiss IndexRefine) for several nprobe and k_factor (k = 10), and IVF-SQ8 alone.
Exploration script that chose the runtime defaults in vpr_edge/runtime/map_index.py; output in diag1m.log."""
import sys, time, math, numpy as np, faiss
from vpr_edge.benchmarks.map_bench import MapBenchConfig, ClusteredVectors
size = int(float(sys.argv[1])); nq = 1000
c = MapBenchConfig(size=size, dim=512).resolved()
print(c, flush=True)
gen = ClusteredVectors(c.size, c.dim, c.clusters, c.spread, c.chunk, c.seed)
rng = np.random.default_rng([c.seed, 2])
source = rng.choice(c.size, size=nq, replace=False)
q = gen.rows(source); q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(c.query_noise / math.sqrt(c.dim))
q /= np.linalg.norm(q, axis=1, keepdims=True)
t=time.time()
ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(c.dim), c.dim, c.nlist, c.m, c.nbits, faiss.METRIC_INNER_PRODUCT)
ivf.train(gen.first(c.train)); print("train", time.time()-t, flush=True)
sq = faiss.IndexScalarQuantizer(c.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
sq.train(gen.first(c.train))
ivfsq = faiss.IndexIVFScalarQuantizer(ivf.quantizer, c.dim, c.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
ivfsq.train(gen.first(c.train))
exact = faiss.IndexFlatIP(c.dim)
t=time.time()
for i in range(gen.chunks):
    x = gen.get(i); ivf.add(x); sq.add(x); exact.add(x); ivfsq.add(x)
print("add", time.time()-t, flush=True)
D, truth = exact.search(q, 10)
print("truth==source", np.mean(truth[:,0]==source), "margin median", np.median(D[:,0]-D[:,1]), flush=True)
_, tl = ivf.quantizer.search(exact.reconstruct_batch(truth[:,0]), 1); tl = tl[:,0]
_, ql = ivf.quantizer.search(q, 1000)
rank_list = np.array([np.flatnonzero(ql[i]==tl[i])[0] if (ql[i]==tl[i]).any() else 9999 for i in range(nq)])
for npb in [1,2,4,8,16,32,64,128,500]:
    print(f"nprobe {npb}: truth list probed {np.mean(rank_list < npb):.3f}")
def lat(index, k, n=300):
    for i in range(20): index.search(q[i:i+1], k)
    ts=[]; ids=np.zeros((nq,k),dtype=np.int64)
    for i in range(nq):
        t0=time.perf_counter(); _, I = index.search(q[i:i+1], k); ts.append(time.perf_counter()-t0); ids[i]=I[0]
    ts=np.array(ts)*1000
    return np.percentile(ts,50), np.percentile(ts,95), ids
for npb in [16, 32, 64, 128, 256]:
    ivf.nprobe = npb
    _, I = ivf.search(q, 1000)
    pos = np.array([np.flatnonzero(I[i]==truth[i,0])[0] if (I[i]==truth[i,0]).any() else 99999 for i in range(nq)])
    print(f"nprobe {npb}: PQ rank of exact top1 <=: " + " ".join(f"{R}:{np.mean(pos<R):.3f}" for R in [1,10,40,100,200,300,400,1000]), flush=True)
    for kf in ([10, 20, 30, 50] if npb in (32, 128) else [30]):
        r = faiss.IndexRefine(ivf, sq); r.k_factor = kf
        p50, p95, ids = lat(r, 10)
        print(f"   refine sq8 kf {kf}: p50 {p50:.2f} p95 {p95:.2f} top1 {np.mean(ids[:,0]==truth[:,0]):.3f}", flush=True)
ivf.nprobe = 500
r = faiss.IndexRefine(ivf, sq); r.k_factor = 30
p50, p95, ids = lat(r, 10); print(f"nprobe 500 refine sq8 kf 30: p50 {p50:.2f} p95 {p95:.2f} top1 {np.mean(ids[:,0]==truth[:,0]):.3f}", flush=True)
for npb in [16, 32, 64, 128]:
    ivfsq.nprobe = npb
    p50, p95, ids = lat(ivfsq, 10); print(f"IVF-SQ8 nprobe {npb}: p50 {p50:.2f} p95 {p95:.2f} top1 {np.mean(ids[:,0]==truth[:,0]):.3f}", flush=True)
