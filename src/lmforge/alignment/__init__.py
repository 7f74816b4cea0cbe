"""Alignment: preference losses, reward models (classifier and pairwise), PPO and DPO, and their recipes."""
