"""Data for training: corpora tokenised and packed, and supervised fine-tuning formats."""
