"""Bootstrap: rank discovery, process-group setup, CLI and SLURM/mpirun helpers."""
