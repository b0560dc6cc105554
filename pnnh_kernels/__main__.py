from pnnh_kernels.commands import main

main()
