"""The static kernel model: every Triton kernel of the project compiled offline for a GPU this machine
does not have, and what the compiled code says (registers, spills, shared memory, the SASS of its main
loop) turned into ceilings to design against; never a measurement.

- ``kernel_cases``: each kernel's launches, recorded from its own launcher on meta tensors;
- ``static_compile``: a recorded launch through ``triton.compile`` for ``GPUTarget("cuda", cc, 32)``,
  read with the ptxas / cuobjdump / nvdisasm in Triton's wheel;
- ``static_model``: the devices and the issue / bandwidth model that turns counts into ceilings;
- ``kernel_report`` (+ ``kernel_report_render``): ``python -m benchmarks.static.kernel_report``;
- ``support_matrix``: every launch under several Triton versions and architectures;
- ``step_kernels``: the kernels one decode step of the engine runs, counted from its compiled graph.
"""
