// Forward attention kernels for head dim 96 (fp16 and bf16): the sm_80 one (attention_kernels.cuh) and
// the opt-in Hopper one (attention_fwd_sm90.cuh).
#include "attention_fwd_sm90.cuh"

TVF_INSTANTIATE_FWD(96)
TVF_INSTANTIATE_FWD_SM90(96)
