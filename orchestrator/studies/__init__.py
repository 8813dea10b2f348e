"""Studies of finished runs: the ablation (Table 2), the report, its measures and plots."""
