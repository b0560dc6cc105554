import argparse

from pnnh_kernels.analysis import run

parser = argparse.ArgumentParser(prog="python -m pnnh_kernels.analysis", description=run.__doc__)
run.add_arguments(parser)
run.run(parser.parse_args())
