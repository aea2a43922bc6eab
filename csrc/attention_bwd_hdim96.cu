// Backward attention kernels (delta preprocess, dQ, dK/dV) for head dim 96 (fp16 and bf16).
// See attention_kernels.cuh.
#include "attention_kernels.cuh"

TVF_INSTANTIATE_BWD(96)
