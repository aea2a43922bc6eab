"""The training application above the library: data sources and annotation formats, decoding,
clip sampling, transforms, the training loop, evaluation and prediction. The library (model, ops,
kernels) never imports this package."""
