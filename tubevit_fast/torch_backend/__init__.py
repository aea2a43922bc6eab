"""Fast pure-PyTorch backend: the CPU path (it also runs on CUDA tensors)."""
