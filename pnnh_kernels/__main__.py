from pnnh_kernels.cli import main

main()
