"""Top-1/top-2 cosine margins of the FP32 reference (W/ref.npz from probe.reference())."""
import numpy as np
z = np.load("/tmp/i8/ref.npz")
n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
s = np.sort(n(z["q"]) @ n(z["db"]).T, 1)[:, ::-1]
m = s[:, 0] - s[:, 1]
print("margin quantiles 5/10/25/50%:", np.quantile(m, [0.05, 0.1, 0.25, 0.5]).round(4).tolist())
print("fraction < 0.005:", round(float((m < 0.005).mean()), 3), "< 0.01:", round(float((m < 0.01).mean()), 3))
