"""The command-line subcommands for training (``tokenizer``, ``pretrain``, ``finetune``).

``register(subparsers)`` adds them to the ``lmforge`` parser; each handler imports its heavy
modules (torch, tokenizers) only when it runs, so ``lmforge --help`` stays fast.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the ``lmforge`` parser (none yet: filled in by the training issue)."""
