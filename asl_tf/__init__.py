"""asl_tf: Action Sensitivity Learning for temporal action localization in TensorFlow / Keras.

Importing the package before TensorFlow turns TensorFlow's oneDNN CPU kernels on unless
`TF_ENABLE_ONEDNN_OPTS` is already set. TensorFlow enables them by default only on CPUs with
AVX-512 / AMX; on AVX2 CPUs its oneDNN MatMul is ~1.3x faster than the Eigen one on this
detector's shapes (README, Benchmarks). Set `TF_ENABLE_ONEDNN_OPTS=0` to keep Eigen. The variable
is read when TensorFlow is imported, so it has no effect if TensorFlow was imported first.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
