"""Training: the loop and its pieces (optimiser, schedule, checkpoints, resume, logging) and the recipes
(pretraining, fine-tuning) built on it."""
