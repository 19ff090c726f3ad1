"""Accelerations of the merge methods, each held equal to a plain reference by the tests: fused task-vector
mixing over threads (``mixing``), magnitude trims and masks without full sorts (``sparsify``), the C kernels
(``_kernels.c``, ``_tie_replay.h``, loaded by ``kernels``; optional: without them the same results come from
torch) and mergekit's half-precision arithmetic reproduced natively (``compat_native``). Nothing here plans
or runs a merge.
"""
