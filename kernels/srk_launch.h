// srk_launch.h: the launch geometry of every backend, in one place.
//
// srkern/_backend.py reads these #defines (kernel_defines) to size GPU and gpu-emu grids; the CPU
// variants in kernels/cpu/ use them directly. No value here changes a bit: every random bit is a
// function of (seed, step, stream, index) and every sum's order is fixed by element indices, so
// geometry is only about speed.
#pragma once

// GPU (cuda, and the grid gpu-emu runs): threads per block, and the grid cap in blocks per
// multiprocessor, past which each thread's grid-stride loop takes further units. 256 x 32 per SM:
// a common starting point for memory-bound grid-stride kernels (full occupancy at 2048 resident
// threads per SM on sm_80/sm_90); a block-size sweep on the target GPU is what would change it.
#define SRK_GPU_BLOCK 256
#define SRK_GPU_BLOCKS_PER_SM 32
// Register budgets (ptxas, sm_90: 65536 registers per SM). SRK_GPU_BOUNDS(b) is
// __launch_bounds__(SRK_GPU_BLOCK, b): ptxas keeps registers low enough for b resident blocks of
// SRK_GPU_BLOCK threads per SM (b = 5: at most 48 registers, b = 8: 32, full occupancy). Measured
// register counts and the limits CI holds them to: tests/test_sass.py. Host compilers (cpu
// backends, gpu-emu) ignore it.
// Each is the largest b that spills nothing; which occupancy is fastest is for a GPU run to say
// (benchmarks/gpu_check.py times these kernels).
//   SRK_REDUCE_MIN_BLOCKS      dist_reduce_*_bf16_{sr,rn}: without a bound the SR kernels take
//                              66-80 registers (3 blocks per SM), RN 44-47; b = 5 gives at most
//                              48, b = 6 spills the SR kernels (76 bytes).
//   SRK_REDUCE_F32_MIN_BLOCKS  dist_reduce_bf16_f32: 48 unbounded, 40 with b = 6; b = 7 spills.
//   SRK_STREAM_MIN_BLOCKS      full occupancy (32 registers): the upcasts of kernels/cast.cu
//                              (29-36 unbounded) and dist_reduce_f32_f32 (44 unbounded).
#define SRK_REDUCE_MIN_BLOCKS 5
#define SRK_REDUCE_F32_MIN_BLOCKS 6
#define SRK_STREAM_MIN_BLOCKS 8
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SRK_GPU_BOUNDS(b) __launch_bounds__(SRK_GPU_BLOCK, b)
#else
#define SRK_GPU_BOUNDS(b)
#endif
// gpu-emu: the multiprocessors of the emulated device (an H200's), unless SRKERN_EMU_SMS is set.
#define SRK_EMU_SMS 132

// CPU AdamW: (tensor, block) pairs per OpenMP work item, handed out dynamically, so on a shared
// machine a descheduled thread delays one chunk, not half the step. A multiple of 8, so that the
// 64-element runs of kernels/cpu/adamw_tile.h stay whole. 2048 pairs = 16K elements, ~20 us of
// work: scheduling costs well under 1%.
#define ADAMW_CPU_CHUNK 2048

// CPU tiled loops (casts, upcasts): below SRK_CPU_PAR_TILES tiles a call runs on the calling
// thread, because waking the OpenMP team costs more than the work (and on a loaded machine a
// descheduled team member stalls the call for a whole time slice).
#define SRK_CPU_PAR_TILES 64
// CPU casts: Philox blocks per tile, the unit of the outer (OpenMP) loop (kernels/cpu/cast_tile.h).
#define CAST_TILE 32
// CPU upcasts: elements per unit of the outer (OpenMP) loop (kernels/cpu/upcast_table.h).
#define UPCAST_CHUNK 4096
