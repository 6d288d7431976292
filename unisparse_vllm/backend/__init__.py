"""vLLM glue: registration, the CPU and CUDA backends, version compatibility. No math here:
selection and attention live in ``core`` / ``kernels``."""
