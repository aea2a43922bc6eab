// Forward attention kernels for head dim 128 (fp16 and bf16). See attention_kernels.cuh.
#include "attention_kernels.cuh"

TVF_INSTANTIATE_FWD(128)
