"""Developer tools: the training-step benchmark (python -m dev.bench) and the GPU check (bash dev/gpu_check.sh)."""
