"""Deployment: quantisation (and later pruning and serving)."""
