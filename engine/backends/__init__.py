"""Decode backends: objects a CausalLM builds from its weights and owns, which run its decode
steps faster than module by module. The modules stay the readable reference."""

from engine.backends.native_cpu import NativeCPU

__all__ = ["NativeCPU"]
