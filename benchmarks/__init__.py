"""quantfx benchmarks: accuracy, speed and model coverage against peers (`python -m benchmarks`).

Shared pieces other code imports: `benchmarks.data.load_fashion_mnist`, the 28x28 nets in
`benchmarks.models` and `benchmarks.training.train_float` (cached float training).
"""
