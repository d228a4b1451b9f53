"""Shared test set-up: offline, CPU, one model cache per test session."""

import os

import pytest

# Nothing may touch the network: hub lookups fail fast, W&B writes offline files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def memray_cache(tmp_path_factory):
    """One cache (tiny pretrained bases, reference statistics) for the whole session.

    MEMRAY_CACHE set by the caller (e.g. .ci/run) is kept, so a warm cache can be reused.
    """
    if "MEMRAY_CACHE" not in os.environ:
        os.environ["MEMRAY_CACHE"] = str(tmp_path_factory.mktemp("memray-cache"))
    return os.environ["MEMRAY_CACHE"]
