"""Deployment: weight quantisation (quantize.py), the OpenAI-compatible server with continuous batching
(server.py, batching.py, protocol.py), its command (commands.py) and the web playground (web/)."""
