"""The torch.library ops of the fused backends, one module per op stem (pnnh_conv, pnnh_linear):
each holds its ops, their fakes and their autograd; backends supply the launchers."""
