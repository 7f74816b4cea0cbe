"""Deployment: weight quantisation (quantize.py), the OpenAI-compatible server with continuous batching
(server.py, batching.py, protocol.py; serve_config.py: ``ServeConfig``, the recipe config of ``lmforge serve``),
its command (cli/serve.py) and the web playground (web/)."""
