"""Runtime: process groups and parallel state, the CPU bring-up, the GPU stack.

* ``parallel``: :class:`ParallelConfig`, Megatron's parallel state on gloo (CPU) or NCCL (GPU);
* ``cpu``: the one module that makes stock megatron-core run on CPU (never on a GPU run);
* ``gpu``: what GPU stack is present (CUDA, TE, apex, NVML, DeepEP), NVML monitoring.
"""
