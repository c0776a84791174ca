"""Shared test fixtures: offline chat-template tokenizers and tiny random models.

Builders live in `tests/chat_templates.py` (tokenizers) and `tests/tiny_models.py` (models);
this file only turns them into session-scoped pytest fixtures so every test file can use them.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # top-level modules (process_data, sampler, train, ...) import as in production

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
