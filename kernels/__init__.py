"""GPU kernels for expert routing (Triton), each beside its plain-torch reference. (Not yet built.)"""
