"""asl_tf: Action Sensitivity Learning for temporal action localization in TensorFlow / Keras.

Importing the package changes no process state. The command-line tools (`asl_tf.flags.
cli_parser`) turn TensorFlow's oneDNN CPU kernels on unless `TF_ENABLE_ONEDNN_OPTS` is set
(TensorFlow enables them by default only on CPUs with AVX-512 / AMX; on AVX2 CPUs its oneDNN
MatMul is ~1.3x faster than the Eigen one on this detector's shapes, see benchmarks/README.md)
and keep TensorFlow's own log lines out of the way. A program using asl_tf as a library sets
`TF_ENABLE_ONEDNN_OPTS=1` itself, before importing TensorFlow, to get the same kernels.
"""
