// Backward attention kernels for head dim 96 (fp16 and bf16): delta preprocess, dQ, dK/dV, and the
// 5-product variant's dK/dV with atomic dQ and its dQ convert pass.
// See attention_kernels.cuh.
#include "attention_kernels.cuh"

TVF_INSTANTIATE_BWD(96)
