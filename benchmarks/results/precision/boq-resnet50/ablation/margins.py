import sys, numpy as np
import vpr_edge.fidelity as F
orig = F.compare_descriptors
saved = []
def wrap(ref, test, db, q, positives=None, ks=(1,5)):
    saved.append((np.asarray(ref, np.float64), np.asarray(test, np.float64), np.asarray(db), np.asarray(q)))
    return orig(ref, test, db, q, positives, ks)
F.compare_descriptors = wrap
from vpr_edge.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
ref, test, db, q = saved[0]
S_r = ref[q] @ ref[db].T; S_t = test[q] @ test[db].T
print("max |S_t - S_r|", np.abs(S_t - S_r).max())
srt = -np.sort(-S_r, axis=1)
gaps = srt[:, :5] - srt[:, 1:6]
print("min consecutive gap in ref top-6 per query (quantiles):", np.quantile(gaps.min(1), [0, .1, .25, .5]))
print("score spread (top1 - top32):", np.quantile(srt[:,0]-srt[:,-1], [0,.5,1]))
print("ref norms", np.linalg.norm(ref,axis=1)[:4], "test norms", np.linalg.norm(test,axis=1)[:4])
print("ref top1", srt[:3,0])
