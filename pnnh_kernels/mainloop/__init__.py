"""The static mainloop model: a kernel's time on Hopper predicted from its SASS, before a GPU runs it.

- :mod:`pnnh_kernels.mainloop.sass`: a cubin's SASS read for its mainloop (instructions per
  iteration by class, MMA work, load bytes);
- :mod:`pnnh_kernels.mainloop.model`: the time model (issue, tensor-core, L2 and DRAM terms);
- :mod:`pnnh_kernels.mainloop.calibration`: the model against the H200's Nsight Compute times of the
  994ebd4 kernels (``python -m pnnh_kernels.mainloop.calibration``).

``python -m pnnh_kernels.triton.report --model`` prints the model's view of the current kernels.
Every time it prints is modelled, not measured.
"""
