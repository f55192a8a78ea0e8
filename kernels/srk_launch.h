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
