"""radio-launch: recipe + cluster config -> plan -> submitit (SLURM or local) -> rank entry."""
